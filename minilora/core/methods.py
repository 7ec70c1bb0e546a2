"""The fine-tuning methods side by side: one name each, applied to a pretrained GPT without changing its code.

    full           every weight trains
    bitfit         only the biases train (Ben Zaken et al. 2021): every Linear's and LayerNorm's bias
    adapters       Houlsby bottlenecks after attention and MLP (adapters.py)
    prefix         trainable keys and values in every attention layer (prefix.py; "prefix-mlp" trains them
                   through Li and Liang's MLP)
    prompt         trainable soft-prompt vectors before the input (prefix.py)
    lora           low-rank updates of Wq and Wv (lora.py)
    lora+adapters  both at once, as the LoRA paper's combinations
    lora+prefix    both at once (the paper's LoRA + PrefixLayer)

``apply_method(model, name, settings)`` prepares a model; ``method_state(model, name)`` is what a checkpoint
of the method must hold, and ``training_memory`` measures what a training step keeps in memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import backend
from .adapters import AdapterConfig, apply_adapters
from .lora import LoRAConfig, apply_lora, merge_lora
from .nn import Module, freeze_pretrained
from .prefix import PrefixConfig, PromptConfig, apply_prefix, apply_prompt, bake_prefix, prefix_modules



@dataclass(frozen=True)
class Method:
    """One fine-tuning method: its name and the parts apply_method puts on the model, in order (each part is
    a key of PARTS); merges: LoRA folds into the weights for inference; bakes: a prefix MLP is computed away."""

    name: str
    parts: tuple

    @property
    def merges(self) -> bool:
        return "lora" in self.parts

    @property
    def bakes(self) -> bool:
        return "prefix_mlp" in self.parts


# the one list of methods: every table, command and study takes its names from here
REGISTRY = {m.name: m for m in (
    Method("full", ("full",)),
    Method("bitfit", ("bitfit",)),
    Method("adapters", ("adapters",)),
    Method("prefix", ("prefix",)),
    Method("prefix-mlp", ("prefix_mlp",)),
    Method("prompt", ("prompt",)),
    Method("lora", ("lora",)),
    Method("lora+adapters", ("lora", "adapters")),
    Method("lora+prefix", ("lora", "prefix")),
)}
METHODS = tuple(REGISTRY)


@dataclass
class MethodSettings:
    """The size of each method. The defaults give the parameter-efficient methods comparable budgets on the
    default tiny GPT (C = 128, 4 layers): LoRA r=4 on Wq, Wv 8,192; adapters m=4 9,248; prefix P=8 8,192;
    BitFit 5,760; prompt P=8 1,024 (one vector per virtual token is all it has)."""

    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(r=4, alpha=8.0))
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    prefix_mlp: PrefixConfig = field(default_factory=lambda: PrefixConfig(reparameterize=True))
    prompt: PromptConfig = field(default_factory=PromptConfig)


def check_method(name: str) -> str:
    if name not in REGISTRY:
        raise ValueError(f"unknown fine-tuning method {name!r}; expected one of {METHODS}")
    return name


def method(name: str) -> Method:
    """The registry entry of a method name (a clear error for an unknown one)."""
    return REGISTRY[check_method(name)]


def apply_bitfit(model: Module) -> Module:
    """Freeze the pretrained weights except every bias (linear layers and LayerNorms); returns the model."""
    freeze_pretrained(model)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.trainable = True
    return model


def _train_everything(model: Module) -> Module:
    for p in model.parameters():
        p.trainable = True
    return model


# what each part of a method does to a model: (model, settings, seed) -> model
PARTS = {
    "full": lambda model, settings, seed: _train_everything(model),
    "bitfit": lambda model, settings, seed: apply_bitfit(model),
    "lora": lambda model, settings, seed: apply_lora(model, settings.lora, seed=seed),
    "adapters": lambda model, settings, seed: apply_adapters(model, settings.adapters, seed=seed),
    "prefix": lambda model, settings, seed: apply_prefix(model, settings.prefix, seed=seed),
    "prefix_mlp": lambda model, settings, seed: apply_prefix(model, settings.prefix_mlp, seed=seed),
    "prompt": lambda model, settings, seed: apply_prompt(model, settings.prompt, seed=seed),
}


def apply_method(model: Module, name: str, settings: MethodSettings | None = None, seed: int = 0) -> Module:
    """Prepare ``model`` (in place) for fine-tuning with method ``name`` (see METHODS); returns the model."""
    entry = method(name)
    settings = settings or MethodSettings()
    for part in entry.parts:
        PARTS[part](model, settings, seed)
    return model


def for_inference(model: Module, name: str) -> Module:
    """Make the trained model as cheap to run as the method allows: merge LoRA into the weights and bake a
    prefix MLP into plain prefixes. Adapters, prefixes and prompts cannot be merged away."""
    entry = method(name)
    if entry.merges:
        merge_lora(model)
    if entry.bakes:
        bake_prefix(model)
    return model


def method_state(model: Module, name: str) -> dict:
    """{name: array} a checkpoint of the fine-tuned method must hold: the whole model for full fine-tuning,
    otherwise only what training changed (a prefix MLP counts as the prefixes it produces)."""
    check_method(name)
    if name == "full":
        return model.state_dict()
    state = {n: p.data for n, p in model.named_parameters(trainable_only=True)
             if not n.startswith("prefix_encoder.")}
    if "prefix_encoder" in vars(model):
        for layer_name, attn in prefix_modules(model):
            state[f"{layer_name}.prefix_keys"], state[f"{layer_name}.prefix_values"] = attn.prefixes()
    return state


# ----------------------------------------------------------------------------------------------------
# memory


def _owner(array):
    """The array that owns the memory of ``array`` (itself, or the base of a view)."""
    while getattr(array, "base", None) is not None and backend.is_array(array.base):
        array = array.base
    return array


def _arrays_in(obj, found: dict) -> None:
    """Collect every array inside nested tuples/lists/dicts, by the memory it owns (views count once)."""
    if backend.is_array(obj):
        base = _owner(obj)
        found[id(base)] = base.nbytes
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _arrays_in(item, found)
    elif isinstance(obj, dict):
        for item in obj.values():
            _arrays_in(item, found)


def activation_bytes(model: Module) -> int:
    """Bytes of the arrays the modules' caches hold right now (after a forward, before its backward); the
    weights a cache refers to are parameters, not activations, and are not counted."""
    found = {}
    for _, module in model.named_modules():
        _arrays_in(module.cached(), found)
    for p in model.parameters():
        found.pop(id(_owner(p.data)), None)
    return sum(found.values())


def training_memory(model: Module, idx, targets, ignore_index=None) -> dict:
    """What one training step keeps (bytes): parameters (all of them, frozen too), gradients and AdamW's two
    moments (trainable ones only), and activations (everything the forward caches for the backward),
    measured by running one forward and backward on idx, targets: integer arrays (B, T). Returns {"parameters",
    "gradients", "optimizer", "activations", "total"}; leaves no gradient behind."""
    from .model import cross_entropy

    trainable = model.parameters(trainable_only=True)
    was_training = model.training
    model.train()
    logits = model.forward(idx)
    activations = activation_bytes(model) + logits.nbytes
    _, dlogits = cross_entropy(logits, targets, ignore_index)
    model.backward(dlogits)
    model.zero_grad()
    model.train(was_training)
    memory = {
        "parameters": sum(p.data.nbytes for p in model.parameters()),
        "gradients": sum(p.data.nbytes for p in trainable),
        "optimizer": 2 * sum(p.data.nbytes for p in trainable),
        "activations": activations,
    }
    memory["total"] = sum(memory.values())
    return memory
