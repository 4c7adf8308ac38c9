"""torch_xent inside Hugging Face ``transformers`` causal language models: one call, and the model's
training loss is torch_xent's, with the LM head fused into it so the (tokens, vocab) logits never exist.

    import torch_xent.transformers
    model = AutoModelForCausalLM.from_pretrained(...)          # or from_config(...)
    torch_xent.transformers.apply_torch_xent(model)            # label_smoothing=, z_loss=, fused_linear=, impl=
    ...train as before (Trainer or a plain loop)...
    torch_xent.transformers.remove_torch_xent(model)           # back to transformers' own loss and head

This module is imported only by the user (``import torch_xent`` does not import it), and needs
``transformers`` (``pip install torch_xent[transformers]``).

How it hooks in, without copying any model's forward. The covered families (``COVERED``) all end
their causal-LM forward the same way::

    logits = self.lm_head(hidden_states)                       # (batch, seq, vocab)
    [Gemma2: logits = softcap * tanh(logits / softcap)]        # config.final_logit_softcapping
    loss = self.loss_function(logits, labels, vocab_size, **kwargs) if labels is not None else None

- ``model.loss_function`` (transformers' own hook: an instance value overrides ``LOSS_MAPPING``) is
  replaced by a function with the semantics of transformers' ``ForCausalLMLoss``: labels shifted
  left by one and padded with ``ignore_index`` (or ``shift_labels`` used as given), ``ignore_index``
  -100, the mean over the counted tokens, or the sum divided by ``num_items_in_batch`` when that is
  passed (gradient accumulation), the loss returned in float32.
- Fused head: a forward pre-hook on the model notes whether this call is training with labels
  (``model.training`` and ``labels`` not None). Only then the head's forward (an instance override of
  the head module's ``forward``; its parameters, tied weights and state-dict keys are untouched) keeps
  the hidden states and returns an empty ``(batch, seq, 0)`` tensor in place of the logits; the loss
  function then computes ``torch_xent.linear_cross_entropy(hidden, head.weight, shifted_labels, ...)``
  with the config's ``final_logit_softcapping`` as ``softcap``. So in that case the model output's
  ``logits`` is that empty tensor, not the logits. Without labels, or in eval mode (evaluation with
  labels, generation), the head computes the logits as before and the loss, if any, is
  ``torch_xent.cross_entropy`` on them.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

try:
    import transformers as _transformers
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("torch_xent.transformers needs the 'transformers' package: "
                      "pip install 'torch_xent[transformers]' (or pip install transformers)") from exc

import torch_xent

__all__ = ["COVERED", "apply_torch_xent", "remove_torch_xent", "is_patched", "causal_lm_loss"]

#: model_type -> the causal-LM class of that family whose head and loss hook this module relies on
#: (the class or a subclass of it is accepted).
COVERED = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gpt_neox": "GPTNeoXForCausalLM",
}

_STATE_ATTR = "_torch_xent_state"
_NO_VALUE = object()


def causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, *,
                   label_smoothing=0.0, z_loss=0.0, impl="auto", **kwargs):
    """transformers' ``ForCausalLMLoss`` computed by ``torch_xent.cross_entropy``, on materialised logits.

    Args:
        logits: ``(batch, seq, vocab)`` (any float dtype; not upcast: the kernel accumulates half types in
            float32).
        labels: ``(batch, seq)`` token ids; position t is the target of position t - 1 (shifted here),
            ``ignore_index`` where nothing is to be predicted. Unused when ``shift_labels`` is given.
        vocab_size: number of classes of ``logits``' last dimension.
        num_items_in_batch: when given (int or 0-d tensor), the loss is the sum over the tokens divided
            by it (gradient accumulation over several micro-batches); else the mean over counted tokens.
        shift_labels: ``(batch, seq)`` targets already aligned with ``logits``.
        label_smoothing, z_loss, impl: as in :func:`torch_xent.cross_entropy`.

    Returns a 0-d float32 tensor. Other keyword arguments (those transformers passes along) are ignored.
    """
    target, reduction = _shifted_targets(labels, shift_labels, ignore_index, num_items_in_batch)
    flat = logits.reshape(-1, vocab_size)
    loss = torch_xent.cross_entropy(flat, target.reshape(-1).to(flat.device), ignore_index=ignore_index,
                                    reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, impl=impl)
    return _finish(loss, num_items_in_batch)


def _shifted_targets(labels, shift_labels, ignore_index, num_items_in_batch):
    if shift_labels is None:
        if labels is None:
            raise ValueError("torch_xent.transformers: the loss needs labels or shift_labels, got neither")
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    return shift_labels, ("sum" if num_items_in_batch is not None else "mean")


def _finish(loss, num_items_in_batch):
    loss = loss.float()
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


class _Patch:
    """What apply_torch_xent installed on one model, and the hooks themselves (bound methods, so a
    deep copy of the model copies them with it)."""

    def __init__(self, model, head, options):
        self.model = model
        self.head = head
        self.options = options
        self.armed = False      # this forward is training with labels: the head keeps the hidden states
        self.pending = None     # those hidden states, until the loss function takes them
        self.prev_loss_function = model.__dict__.get("_loss_function", _NO_VALUE)
        self.labels_position = _labels_position(model)
        self.handles = []

    # -- hooks --------------------------------------------------------------------------------------
    def pre_forward(self, module, args, kwargs):
        labels = kwargs.get("labels")
        if labels is None and self.labels_position is not None and len(args) > self.labels_position:
            labels = args[self.labels_position]
        self.pending = None
        self.armed = bool(self.options["fused_linear"] and module.training and labels is not None)

    def post_forward(self, module, args, output):
        pending, self.pending, self.armed = self.pending, None, False
        if pending is not None:
            raise RuntimeError(f"torch_xent.transformers: {type(module).__name__}.forward called its LM head with "
                               "labels but never called model.loss_function, so the fused loss was not computed; "
                               "this model's forward does not follow the covered pattern: call "
                               "remove_torch_xent(model) or apply_torch_xent(model, fused_linear=False)")

    def head_forward(self, hidden):
        if not self.armed:
            return type(self.head).forward(self.head, hidden)
        self.armed = False
        self.pending = hidden
        return hidden.new_empty((*hidden.shape[:-1], 0))

    def loss_function(self, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                      shift_labels=None, **kwargs):
        opts = self.options
        hidden, self.pending = self.pending, None
        if hidden is None:
            return causal_lm_loss(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels,
                                  label_smoothing=opts["label_smoothing"], z_loss=opts["z_loss"], impl=opts["impl"])
        target, reduction = _shifted_targets(labels, shift_labels, ignore_index, num_items_in_batch)
        target = target.to(hidden.device)
        if tuple(target.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(f"Expected input batch_size ({hidden.shape[:-1].numel()}) to match target batch_size "
                             f"({target.numel()}). (torch_xent.transformers: the LM head saw hidden states of shape "
                             f"{list(hidden.shape)} but the labels have shape {list(target.shape)}; "
                             "logits_to_keep must keep every position when training with labels)")
        weight, bias = self.head.weight, getattr(self.head, "bias", None)
        dev = hidden.device.type
        if torch.is_autocast_enabled(dev):  # what F.linear in the head would have computed in
            dtype = torch.get_autocast_dtype(dev)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with torch.autocast(dev, enabled=False):
            loss = torch_xent.linear_cross_entropy(
                hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1), linear_bias=bias,
                reduction=reduction, ignore_index=ignore_index, label_smoothing=opts["label_smoothing"],
                z_loss=opts["z_loss"], softcap=getattr(self.model.config, "final_logit_softcapping", None),
                impl=opts["impl"])
        return _finish(loss, num_items_in_batch)

    # -- install / remove ---------------------------------------------------------------------------
    def install(self):
        self.handles = [self.model.register_forward_pre_hook(self.pre_forward, with_kwargs=True),
                        self.model.register_forward_hook(self.post_forward)]
        self.head.forward = self.head_forward
        self.model.loss_function = self.loss_function
        setattr(self.model, _STATE_ATTR, self)

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []
        self.head.__dict__.pop("forward", None)
        if self.prev_loss_function is _NO_VALUE:
            self.model.__dict__.pop("_loss_function", None)
        else:
            self.model._loss_function = self.prev_loss_function
        self.pending, self.armed = None, False
        self.model.__dict__.pop(_STATE_ATTR, None)


def _labels_position(model):
    """Index of ``labels`` among forward's positional arguments (after self), or None."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for i, p in enumerate(params):
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return None
        if p.name == "labels":
            return i
    return None


def _check_covered(model):
    if not isinstance(model, _transformers.PreTrainedModel):
        raise TypeError(f"torch_xent.transformers.apply_torch_xent: expected a transformers PreTrainedModel, got "
                        f"{type(model).__name__}")
    model_type = getattr(model.config, "model_type", None)
    covered = ", ".join(f"{k} ({v})" for k, v in COVERED.items())
    expected = COVERED.get(model_type)
    if expected is None or expected not in {c.__name__ for c in type(model).__mro__}:
        raise ValueError(f"torch_xent.transformers: {type(model).__name__} (model_type {model_type!r}) is not "
                         f"covered; covered causal LMs: {covered}. Other models are not patched because their "
                         "forward may transform the logits between the head and the loss")
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"torch_xent.transformers: {type(model).__name__}'s output embedding is "
                         f"{type(head).__name__}, not an nn.Linear; cannot fuse it with the loss")
    return head


def apply_torch_xent(model, *, fused_linear=True, label_smoothing=0.0, z_loss=0.0, impl="auto"):
    """Makes ``model`` (a covered transformers causal LM, see ``COVERED``) train with torch_xent.

    Args:
        model: e.g. ``LlamaForCausalLM``; patched in place and returned.
        fused_linear: in training mode with labels, run the LM head and the loss as one
            ``torch_xent.linear_cross_entropy`` on the hidden states (the output's ``logits`` is then an
            empty ``(batch, seq, 0)`` tensor). False: the head computes the logits as usual and only the
            loss is torch_xent's.
        label_smoothing, z_loss: passed to the loss (transformers' own loss has neither).
        impl: ``"auto"``, ``"native"``, ``"aten"`` or ``"reference"``, as in :func:`torch_xent.cross_entropy`.

    The config's ``final_logit_softcapping`` (Gemma2) is applied by the fused loss as ``softcap``, as
    the model's forward applies it to its logits. Calling it again on a patched model replaces the
    options; :func:`remove_torch_xent` undoes it. Raises ValueError for a model that is not covered.
    """
    if impl not in ("auto", "native", "aten", "reference"):
        raise ValueError(f"impl must be 'auto', 'native', 'aten' or 'reference', got {impl!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    if not float(z_loss) >= 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    head = _check_covered(model)
    options = {"fused_linear": bool(fused_linear), "label_smoothing": float(label_smoothing),
               "z_loss": float(z_loss), "impl": impl}
    state = model.__dict__.get(_STATE_ATTR)
    if state is not None:
        if state.head is head:
            state.options = options
            return model
        state.remove()  # the output embedding was replaced since: patch the new one
    _Patch(model, head, options).install()
    return model


def remove_torch_xent(model):
    """Undoes :func:`apply_torch_xent` (transformers' own loss and head again); a no-op on a model that is
    not patched. Returns the model."""
    state = model.__dict__.get(_STATE_ATTR)
    if state is not None:
        state.remove()
    return model


def is_patched(model) -> bool:
    """Whether :func:`apply_torch_xent` is in effect on ``model``."""
    return model.__dict__.get(_STATE_ATTR) is not None
