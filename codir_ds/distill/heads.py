"""The module DeepSpeed trains: the student plus the objective's learnable heads.

CRD's projections phi_s and phi_t are trained with the student (phi_t maps the
frozen teacher's features; the teacher body itself is never in the optimizer).
Keeping them inside the engine's module means ZeRO partitions and checkpoints them
with the student, and ZeRO-3 gathers their parameters during ``forward``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from codir_ds.distill.ild import mix_targets, mixup_embeddings
from codir_ds.models.loading import hidden_size, resolve_layers
from codir_ds.models.mlm import gather_rows, mlm_parts
from codir_ds.models.pooling import pool_layers


class ProjectionHead(nn.Module):
    """Linear map of concatenated pooled layers ``[B, L*d]`` to the contrastive space ``[B, m]``."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.to(self.linear.weight.dtype))


class ILDSpec:
    """What the intermediate-layer methods read from the student (pkd, tinybert, distilbert, cr_ild).

    ``pairs``: ``[(student_layer, teacher_layer)]`` (0 = embeddings); ``kind``: ``"cls"`` (pkd:
    the [CLS] row of each mapped layer) or ``"hidden"`` (whole sequences); ``attention``:
    also the attention maps of mapped Transformer layers (tinybert, cr_ild); ``consistency``:
    cr_ild's mixup consistency on the last layer.
    """

    def __init__(self, pairs, kind: str, attention: bool, consistency: bool = False):
        self.pairs = [tuple(p) for p in pairs]
        self.kind = kind
        self.attention = attention
        self.consistency = consistency

    @property
    def student_layers(self) -> list[int]:
        return [s for s, _ in self.pairs]

    @property
    def teacher_layers(self) -> list[int]:
        return [t for _, t in self.pairs]

    @property
    def attention_pairs(self) -> list[tuple[int, int]]:
        """Pairs whose maps are compared: Transformer layers only (the embeddings have no attention)."""
        return [(s, t) for s, t in self.pairs if s > 0 and t > 0] if self.attention else []


def use_eager_attention(model: nn.Module) -> None:
    """Attention maps are only returned by the eager implementation (SDPA computes none)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # older transformers
        model.config._attn_implementation = "eager"


def ild_features(hidden_states, attentions, mask: torch.Tensor, spec: ILDSpec, layers_from: str,
                 projections: Optional[nn.ModuleList] = None) -> dict:
    """The mapped layers of one side (``layers_from`` "student" or "teacher"), as the fields of
    :class:`~codir_ds.distill.methods.base.LayerFeatures`: ``mask`` and ``cls`` or ``hidden`` (and ``attn``)."""
    idx = spec.student_layers if layers_from == "student" else spec.teacher_layers
    out = {"mask": mask}
    if spec.kind == "cls":
        feats = [hidden_states[i][:, 0] for i in idx]
    else:
        feats = [hidden_states[i] for i in idx]
    if projections is not None:
        feats = [proj(f.to(proj.weight.dtype)) for proj, f in zip(projections, feats)]
    out[spec.kind] = feats
    if spec.attention:
        a_idx = [s if layers_from == "student" else t for s, t in spec.attention_pairs]
        out["attn"] = [attentions[i - 1] for i in a_idx]
    return out


def build_module(student: nn.Module, teacher: Optional[nn.Module], method, masked_lm: bool = False):
    """``(module, teacher_layers)``: what DeepSpeed trains, ``student`` plus the heads ``method`` asks for (its
    :class:`~codir_ds.distill.methods.base.ContrastSpec`'s phi_s / phi_t, its layer pairs' width maps), and the
    teacher layers the teacher runner pools (None without a contrast spec). ``masked_lm``: pre-training's module."""
    spec = method.contrast
    s_layers = resolve_layers(spec.student_layers if spec else "all", student, "method.student_layers")
    t_layers = resolve_layers(spec.teacher_layers, teacher, "method.teacher_layers") if spec else None
    ild_spec = build_ild_spec(method, student, teacher)
    module = (PretrainModule if masked_lm else DistillationModule)(
        student, s_layers, spec.pooling if spec else "mean",
        teacher_dim=len(t_layers) * hidden_size(teacher) if spec else None,
        projection_dim=spec.projection_dim if spec else None,
        ild_spec=ild_spec, teacher_width=hidden_size(teacher) if ild_spec is not None else None)
    return module, t_layers


def build_ild_spec(method, student, teacher) -> Optional[ILDSpec]:
    """The layer pairs and features an ILD method distils (None when the method reads no layers)."""
    spec = method.layers
    if spec is None:
        return None
    pairs = method.layer_pairs(student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    return ILDSpec(pairs, spec.kind, attention=spec.attention, consistency=spec.consistency)


class DistillationModule(nn.Module):
    """Student classifier with the objective's learnable heads.

    ``forward`` returns a dict with ``logits`` ``[B, C]``; with CRD heads and
    ``teacher_features`` ``[B, Lt*d_t]`` also ``h_s`` and ``h_t`` ``[B, m]`` (``hold_encoder=True``:
    ``h_s`` is projected from detached pooled layers, so the CRD gradient trains the heads but
    stops before the student body, ``method.crd_encoder_delay``); with ``ild=True``
    ``layers``, the student's mapped layers (:func:`ild_features`), projected to the
    teacher's width by one learned linear map per layer pair when the widths differ. With
    ``mix=(lam, partner)`` the student runs on mixed word embeddings (CR-ILD) and, for the
    consistency term, also on the clean inputs without gradient (itself, or ``clean_model``:
    an EMA copy), whose mixed last-layer states and attention are the targets.
    """

    def __init__(self, student: nn.Module, student_layers: Sequence[int], pooling: str = "mean",
                 teacher_dim: Optional[int] = None, projection_dim: Optional[int] = None,
                 ild_spec: Optional[ILDSpec] = None, teacher_width: Optional[int] = None):
        super().__init__()
        self.student = student
        self.student_layers = list(student_layers)
        self.pooling = pooling
        if projection_dim:
            s_dim = len(self.student_layers) * student.config.hidden_size
            self.proj_s = ProjectionHead(s_dim, projection_dim)
            self.proj_t = ProjectionHead(teacher_dim, projection_dim)
        else:
            self.proj_s = self.proj_t = None
        self.ild_spec = ild_spec
        self.ild_proj = None
        if ild_spec is not None:
            d_s = student.config.hidden_size
            if teacher_width is not None and teacher_width != d_s:
                self.ild_proj = nn.ModuleList(nn.Linear(d_s, teacher_width) for _ in ild_spec.pairs)
            if ild_spec.attention:
                use_eager_attention(student)

    def _ild(self, out, mask) -> dict:
        return ild_features(out.hidden_states, out.attentions, mask, self.ild_spec, "student", self.ild_proj)

    def project_student(self, hidden_states, attention_mask, hold_encoder: bool = False) -> torch.Tensor:
        """``[B, m]`` ``h^s``: the pooled student layers through phi_s (detached first with ``hold_encoder``)."""
        pooled = pool_layers(hidden_states, attention_mask, self.student_layers, self.pooling)
        return self.proj_s(pooled.detach() if hold_encoder else pooled)

    def student_features(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """``[B, m]`` projected student features ``h^s`` alone (no teacher): the bank's warm start."""
        out = self.student(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                           output_hidden_states=True)
        return self.project_student(out.hidden_states, attention_mask)

    def forward(self, input_ids, attention_mask, token_type_ids=None,
                teacher_features: Optional[torch.Tensor] = None, ild: bool = False,
                mix: Optional[tuple] = None, clean_model: Optional[nn.Module] = None,
                hold_encoder: bool = False) -> dict:
        want_features = self.proj_s is not None and teacher_features is not None
        attn = ild and self.ild_spec.attention
        kwargs = dict(token_type_ids=token_type_ids, output_hidden_states=want_features or ild,
                      output_attentions=attn)
        mask = attention_mask
        if mix is not None:
            lam, partner = mix
            embeds, mask = mixup_embeddings(self.student.get_input_embeddings()(input_ids), attention_mask,
                                            lam, partner)
            out = self.student(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        else:
            out = self.student(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        result = {"logits": out.logits}
        if want_features:
            result["h_s"] = self.project_student(out.hidden_states, attention_mask, hold_encoder)
            result["h_t"] = self.proj_t(teacher_features)
        if ild:
            result["layers"] = self._ild(out, mask)
            if mix is not None and self.ild_spec.consistency:
                with torch.no_grad():
                    clean = (clean_model or self.student)(
                        input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        output_hidden_states=True, output_attentions=attn)
                cons = {"hidden": out.hidden_states[-1],
                        "hidden_target": mix_targets(clean.hidden_states[-1], lam, partner)}
                if attn:
                    cons["attn"] = out.attentions[-1]
                    cons["attn_target"] = mix_targets(clean.attentions[-1], lam, partner)
                result["consistency"] = cons
        return result


class PretrainModule(DistillationModule):
    """Masked-LM student with optional CRD heads (pre-training distillation).

    ``forward`` returns ``logits`` ``[M, V]`` at the flat masked positions ``rows`` only
    (see :func:`codir_ds.models.mlm.masked_rows`) and, with CRD heads and
    ``teacher_features``, ``h_s`` / ``h_t`` ``[B, m]`` pooled from the same masked input;
    with ``ild=True`` the mapped layers (``layers``) of the masked input (tinybert, distilbert
    pre-training).
    """

    def student_features(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """``[B, m]`` projected student features ``h^s`` alone (no teacher, no MLM head): the bank's warm start."""
        out = mlm_parts(self.student)[0](input_ids=input_ids, attention_mask=attention_mask,
                                         token_type_ids=token_type_ids, output_hidden_states=True)
        return self.project_student(out.hidden_states, attention_mask)

    def forward(self, input_ids, attention_mask, rows: torch.Tensor, token_type_ids=None,
                teacher_features: Optional[torch.Tensor] = None, ild: bool = False, hold_encoder: bool = False,
                mix: Optional[tuple] = None, clean_model: Optional[nn.Module] = None) -> dict:
        if mix is not None:
            raise ValueError("pre-training does not mix inputs")
        body, head = mlm_parts(self.student)
        want_features = self.proj_s is not None and teacher_features is not None
        out = body(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                   output_hidden_states=want_features or ild, output_attentions=ild and self.ild_spec.attention)
        result = {"logits": head(gather_rows(out.last_hidden_state, rows))}
        if want_features:
            result["h_s"] = self.project_student(out.hidden_states, attention_mask, hold_encoder)
            result["h_t"] = self.proj_t(teacher_features)
        if ild:
            result["layers"] = self._ild(out, attention_mask)
        return result
