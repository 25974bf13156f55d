"""``crd`` — Contrastive Representation Distillation (Tian, Krishnan & Isola, ICLR 2020).

Reference: RepDistiller ``crd/criterion.py`` (``CRDLoss``, ``ContrastLoss``, ``Embed``),
``crd/memory.py`` (``ContrastMemory``) and ``train_student.py`` (``--distill crd``:
CE 1, ``-b 0.8``, no KD term; "CRD+KD" adds ``-a 1``, KL at T 4); defaults ``feat_dim``
128, ``nce_k`` 16384, ``nce_t`` 0.07, ``nce_m`` 0.5.

On ``pooled``: the student's and the teacher's embeddings e_s, e_t (``Embed``: a linear
layer to ``feat_dim``, then L2 normalisation; both trained, the teacher's on detached
features). ``mode = "exact"`` (the default) is the reference's memory-bank form: two
banks of n_data × feat_dim (one row per training sample: ``bank_s`` holds student
embeddings, ``bank_t`` teacher ones), initialised uniform in [−s, s], s = 1/√(feat_dim/3).
For a batch with dataset indices i (the loop's ``start_batch``), each sample gets K =
``nce_k`` negatives, drawn uniformly with replacement from the training samples of the
*other classes* — the reference's CIFAR data set (``CIFAR100InstanceSample``) draws them
from ``cls_negative[target]`` (without replacement; with replacement here, as its
``AliasMethod`` fallback, so the draw is vectorised at any data-set size) — or, where
the split's labels are unknown, from every sample but the positive; column 0 is the
positive, the sample itself. Scores: x = exp(⟨bank_t[j], e_s⟩ / nce_t) / Z_s (student
anchor) and exp(⟨bank_s[j], e_t⟩ / nce_t) / Z_t (teacher anchor); Z = mean(exp(·)) ·
n_data, estimated on the first batch and then fixed (saved with the banks). The NCE loss
(``ContrastLoss``, the paper's eq. 18) with P_n = 1/n_data:

    −(1/B) Σ_b [ log(x_b0 / (x_b0 + K·P_n + ε)) + Σ_k log(K·P_n / (x_bk + K·P_n + ε)) ],  ε = 1e-7,

summed over both anchors. After scoring, the positives' rows are updated:
bank[i] ← normalise(m · bank[i] + (1 − m) · e), m = ``nce_momentum`` (vectorised,
``index_copy_``; under torchrun every rank's rows are gathered so the ranks' banks stay equal).

Memory: the banks take 2 × n_data × feat_dim × 4 bytes — CIFAR-100 (45,000 / 50,000
training images) 46 / 51 MB, ImageNet (1.28 M) 1.3 GB — saved in ``last.pt`` with the
loss's state; each step also gathers 2 × B × (K + 1) × feat_dim floats (B = 64, K = 16384:
1.07 GB, as the reference). Negatives come from the loss's own generator, seeded from
the stage's seed (the global RNG at set-up) and saved in the loss's state, so a resumed
stage draws the same negatives. Under torchrun each rank draws with its own copy and
rank 0's is saved: a resumed multi-rank run is exact on rank 0's draws only.

``mode = "relax"`` is the in-batch form (no bank, no indices): positives of a sample are
the batch's samples of its class, negatives the other batch samples; per anchor side
−mean over positives of log softmax_j(⟨e_s,i, e_t,j⟩ / nce_t) (and the transposed for
the teacher side), summed. (The reference's ``relax`` instead takes one random bank row
of the same class as the positive.) ``exact`` called without indices — a direct call
``loss(student, [teacher], targets)``, or validation with ``select = "val_loss"`` —
uses that in-batch form with the sample itself as the only positive (a warning once
when no bank was ever set up; no bank update); in training, with a bank but no indices,
it is an error (the loop gives indices to every loss with ``needs_indices``).

The loss: ``ce_weight·CE + feat_weight·term + kd_weight·T²·KL(p_t ‖ p_s)`` at T =
``temperature``.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from pyramidkd.engine import FieldValueError, UserError, hookimpl, non_negative, positive
from pyramidkd.plugins.losses.learned import LearnedTermLoss, tapped
from pyramidkd.plugins.losses.tapped import at_least_float32, ce_weight_field, feat_weight_field, one_teacher

EPS = 1e-7  # the reference's ContrastLoss eps
log = logging.getLogger("pyramidkd")


def _momentum(instance, attribute, value):
    if not 0.0 <= value < 1.0:
        raise FieldValueError(f"must be in [0, 1), got {value!r}", f"set {attribute.name} to e.g. 0.5 (the reference's)")


@attrs.define
class CRDParams:
    ce_weight: float = ce_weight_field()
    feat_weight: float = feat_weight_field(0.8)
    kd_weight: float = attrs.field(default=0.0, validator=non_negative, metadata={"help": "weight of the KL term (CRD+KD: 1)"})
    temperature: float = attrs.field(default=4.0, validator=positive, metadata={"help": "temperature of the KL term"})
    feat_dim: int = attrs.field(default=128, validator=positive, metadata={"help": "width of the embeddings and the memory banks"})
    nce_k: int = attrs.field(default=16384, validator=positive, metadata={"help": "negatives per sample (exact mode)"})
    nce_t: float = attrs.field(default=0.07, validator=positive, metadata={"help": "temperature of the contrastive scores"})
    nce_momentum: float = attrs.field(default=0.5, validator=_momentum, metadata={"help": "momentum of the bank rows' update"})
    mode: Literal["exact", "relax"] = attrs.field(default="exact", metadata={
        "help": "exact: the memory bank, positive = the sample itself; relax: in-batch, positives = same-class samples"})


class Embed(nn.Module):
    """RepDistiller's ``Embed``: flatten, one linear layer, L2 normalisation."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x.reshape(x.shape[0], -1))
        return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


def nce_loss(x: torch.Tensor, n_data: int) -> torch.Tensor:
    """RepDistiller's ``ContrastLoss`` on scores x [B, K + 1] (column 0 the positive)."""
    m = x.shape[1] - 1
    noise = m / float(n_data)
    log_d1 = torch.log(x[:, 0] / (x[:, 0] + noise + EPS))
    log_d0 = torch.log(noise / (x[:, 1:] + noise + EPS))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]


def in_batch_term(e_s: torch.Tensor, e_t: torch.Tensor, positives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Both anchor sides of −mean_{j ∈ P(i)} log softmax_j(⟨e_i, e'_j⟩ / T), ``positives`` a [B, B] 0/1 mask."""
    logits = e_s @ e_t.t() / temperature
    weights = positives / positives.sum(1, keepdim=True)
    student_side = -(weights * F.log_softmax(logits, dim=1)).sum(1).mean()
    teacher_side = -(weights.t() * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return student_side + teacher_side


class ContrastMemory(nn.Module):
    """The two banks, the fixed normalisers Z and the negatives' generator (RepDistiller's ``ContrastMemory``)."""

    def __init__(self, n_data: int, feat_dim: int, labels: torch.Tensor | None):
        super().__init__()
        self.n_data = n_data
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("bank_s", torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("bank_t", torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("normalizers", torch.tensor([-1.0, -1.0]))  # Z_s, Z_t; < 0: not set yet
        self.seed = int(torch.randint(0, 2**62, (1,)).item())  # from the stage's seeded global RNG
        self.generator: torch.Generator | None = None
        self.pending_state: torch.Tensor | None = None
        # Where each sample's excluded group (its class, or itself) sits in `order`: non-persistent, rebuilt from the labels.
        classes = labels is not None and len(labels) == n_data and labels.unique().numel() > 1
        labels = labels.long() if classes else torch.arange(n_data)
        counts = torch.bincount(labels)
        starts = counts.cumsum(0) - counts
        self.register_buffer("order", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("group_start", starts[labels], persistent=False)
        self.register_buffer("group_count", counts[labels], persistent=False)

    def get_extra_state(self) -> dict:
        generator_state = self.generator.get_state() if self.generator is not None else self.pending_state
        return {"seed": self.seed, "generator": generator_state}

    def set_extra_state(self, state: dict) -> None:
        self.seed, self.pending_state = int(state["seed"]), state["generator"]
        self.generator = None  # made again, on the banks' device, from the saved state

    def draw_contrast(self, indices: torch.Tensor, k: int) -> torch.Tensor:
        """[B, K + 1] bank rows: the positive, then K negatives outside its group (uniform, with replacement)."""
        device = self.bank_s.device
        if self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
            if self.pending_state is not None:
                self.generator.set_state(self.pending_state)
        start, count = self.group_start[indices].unsqueeze(1), self.group_count[indices].unsqueeze(1)
        room = (self.n_data - count).double()
        draw = torch.rand(indices.shape[0], k, generator=self.generator, device=device, dtype=torch.float64)
        position = torch.minimum((draw * room).long(), (room - 1).long())
        position = position + (position >= start).long() * count  # skip over the excluded group
        return torch.cat([indices.unsqueeze(1), self.order[position]], dim=1)

    def scores(self, e_s: torch.Tensor, e_t: torch.Tensor, contrast: torch.Tensor, temperature: float):
        """exp(⟨bank row, e⟩ / T) / Z for both anchors; Z set from the first batch."""
        batch, dim = e_s.shape[0], e_s.shape[1]
        rows_t = self.bank_t.index_select(0, contrast.reshape(-1)).view(batch, -1, dim)
        rows_s = self.bank_s.index_select(0, contrast.reshape(-1)).view(batch, -1, dim)
        out_s = torch.exp(torch.bmm(rows_t, e_s.unsqueeze(2)).squeeze(2) / temperature)  # student anchor
        out_t = torch.exp(torch.bmm(rows_s, e_t.unsqueeze(2)).squeeze(2) / temperature)  # teacher anchor
        with torch.no_grad():
            first = torch.stack([out_s.mean(), out_t.mean()]) * self.n_data
            self.normalizers.copy_(torch.where(self.normalizers < 0, first, self.normalizers))
        return out_s / self.normalizers[0], out_t / self.normalizers[1]

    @torch.no_grad()
    def update(self, indices: torch.Tensor, e_s: torch.Tensor, e_t: torch.Tensor, momentum: float) -> None:
        """bank[i] ← normalise(m·bank[i] + (1 − m)·e) for the batch's rows (every rank's under torchrun)."""
        indices, e_s, e_t = gather_ranks(indices, e_s.detach(), e_t.detach())
        for bank, e in ((self.bank_s, e_s), (self.bank_t, e_t)):
            rows = bank.index_select(0, indices).mul_(momentum).add_(e.to(bank.dtype), alpha=1 - momentum)
            bank.index_copy_(0, indices, rows / rows.pow(2).sum(1, keepdim=True).pow(0.5))


def gather_ranks(indices: torch.Tensor, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's ``indices`` and ``rows`` (shares differ by at most one: padded, then
    dropped); this rank's alone outside torchrun."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return (indices, *rows)
    size = torch.tensor([indices.shape[0]], device=indices.device)
    dist.all_reduce(size, op=dist.ReduceOp.MAX)
    pad = int(size.item()) - indices.shape[0]
    parts = [F.pad(indices, (0, pad), value=-1)] + [F.pad(r, (0, 0, 0, pad)) for r in rows]
    gathered = []
    for part in parts:
        pieces = [torch.empty_like(part) for _ in range(dist.get_world_size())]
        dist.all_gather(pieces, part.contiguous())
        gathered.append(torch.cat(pieces))
    keep = gathered[0] >= 0
    return tuple(g[keep] for g in gathered)


class CRDLoss(LearnedTermLoss):
    """Contrastive representation distillation (Tian et al. 2020): CE + feat_weight · NCE(bank) (+ kd_weight · KD)."""

    name = "crd"
    Params = CRDParams
    taps = ("pooled",)
    rank_local_buffers = ("memory",)  # the bank update gathers every rank's rows itself

    def __init__(self, params=None):
        super().__init__(params)
        self.embed_s: Embed | None = None
        self.embed_t: Embed | None = None
        self.memory: ContrastMemory | None = None
        self.needs_indices = self.params.mode == "exact"
        self.warned = False

    def setup_data(self, size, labels):
        if self.params.mode == "exact":
            self.memory = ContrastMemory(size, self.params.feat_dim, labels)

    def module_shapes(self, student, teacher):
        return {f"{role} pooled": (tapped(output, "pooled", self.name, role)[0].numel(),)
                for role, output in (("student", student), ("teacher", teacher))}

    def build(self, shapes):
        self.embed_s = Embed(shapes["student pooled"][0], self.params.feat_dim)
        self.embed_t = Embed(shapes["teacher pooled"][0], self.params.feat_dim)

    def forward(self, student, teachers, targets):
        teacher = one_teacher(teachers, self.name)
        self.ensure_built(student, teacher)
        indices, self.batch_indices = self.batch_indices, None  # one batch's indices serve one call
        with torch.autocast(student.logits.device.type, enabled=False):
            term = self.contrast_term(student, teacher, targets, indices)
        loss = self.params.feat_weight * term
        if self.params.ce_weight > 0:
            loss = loss + self.params.ce_weight * F.cross_entropy(at_least_float32(student.logits), targets)
        if self.params.kd_weight > 0:
            t = self.params.temperature
            kl = F.kl_div(F.log_softmax(at_least_float32(student.logits) / t, dim=1),
                          F.softmax(at_least_float32(teacher.logits.detach()) / t, dim=1), reduction="batchmean")
            loss = loss + self.params.kd_weight * t * t * kl
        return loss

    def contrast_term(self, student, teacher, targets, indices) -> torch.Tensor:
        dtype = self.compute_dtype()
        e_s = self.embed_s(student.features["pooled"].to(dtype))
        e_t = self.embed_t(teacher.features["pooled"].detach().to(dtype))
        if self.params.mode == "relax":
            same_class = (targets.unsqueeze(1) == targets.unsqueeze(0)).to(dtype)
            return in_batch_term(e_s, e_t, same_class, self.params.nce_t)
        if indices is None:
            self.check_without_indices()
            return in_batch_term(e_s, e_t, torch.eye(e_s.shape[0], dtype=dtype, device=e_s.device), self.params.nce_t)
        contrast = self.memory.draw_contrast(indices, self.params.nce_k)
        out_s, out_t = self.memory.scores(e_s, e_t, contrast, self.params.nce_t)
        term = nce_loss(out_s, self.memory.n_data) + nce_loss(out_t, self.memory.n_data)
        if self.training:
            self.memory.update(indices, e_s, e_t, self.params.nce_momentum)
        return term

    def check_without_indices(self) -> None:
        """Without indices: the in-batch form, except in training with a bank (then an engine misuse)."""
        if self.memory is not None and self.training:
            raise UserError(
                "loss 'crd' (mode = \"exact\") needs each training batch's dataset indices, and none were given",
                fix="train it through the engine's loop, which calls loss.start_batch(indices) for losses with "
                    "needs_indices; a direct call loss(student, [teacher], targets) gets the in-batch form, or use mode = \"relax\"")
        if self.memory is None and not self.warned:
            self.warned = True
            log.warning("loss 'crd' (mode = \"exact\") called without dataset indices or memory bank: "
                        "using the in-batch form (each sample its own positive, the batch's others its negatives)")


@hookimpl
def pyramidkd_register_losses():
    return [CRDLoss]
