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
    dora           LoRA's update with its column norms split off into a trained magnitude (Liu et al. 2024; dora.py)
    vera           one frozen random pair A, B shared by every layer, trained scaling vectors (Kopiczko et al.
                   2024; vera.py)
    loraplus       LoRA with B learning lambda times faster than A (Hayou et al. 2024)
    qlora          LoRA on a frozen base stored as 4-bit NF4 codes (Dettmers et al. 2023; quant.py)

``apply_method(model, name, settings)`` prepares a model; ``method_state(model, name)`` is what a checkpoint
of the method must hold, and ``training_memory`` measures what a training step keeps in memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from . import backend
from .adapters import AdapterConfig, apply_adapters
from .lora import LoRAConfig, apply_lora, merge_lora
from .nn import Module, freeze_pretrained
from .prefix import PrefixConfig, PromptConfig, apply_prefix, apply_prompt, bake_prefix, prefix_modules
from .quant import NF4Config, quantize_base
from .vera import VeRAConfig, apply_vera



@dataclass(frozen=True)
class Method:
    """One fine-tuning method: its name and the parts apply_method puts on the model, in order (each part is
    a key of PARTS); merges: its update folds into the weights for inference (merge_lora); bakes: a prefix MLP
    is computed away (bake_prefix)."""

    name: str
    parts: tuple
    merges: bool = False
    bakes: bool = False


# the one list of methods: every table, command and study takes its names from here
REGISTRY = {m.name: m for m in (
    Method("full", ("full",)),
    Method("bitfit", ("bitfit",)),
    Method("adapters", ("adapters",)),
    Method("prefix", ("prefix",)),
    Method("prefix-mlp", ("prefix_mlp",), bakes=True),
    Method("prompt", ("prompt",)),
    Method("lora", ("lora",), merges=True),
    Method("lora+adapters", ("lora", "adapters"), merges=True),
    Method("lora+prefix", ("lora", "prefix"), merges=True),
    Method("dora", ("dora",), merges=True),
    Method("vera", ("vera",), merges=True),
    Method("loraplus", ("loraplus",), merges=True),
    # merging into a 4-bit base would round the update away: QLoRA keeps its adapters beside the NF4 weights
    Method("qlora", ("nf4", "lora")),
)}
METHODS = tuple(REGISTRY)


@dataclass
class MethodSettings:
    """The size of each method. The defaults give the parameter-efficient methods comparable budgets on the
    default tiny GPT (C = 128, 4 layers): LoRA r=4 on Wq, Wv 8,192; adapters m=4 9,248; prefix P=8 8,192;
    BitFit 5,760; prompt P=8 1,024 (one vector per virtual token is all it has); VeRA r=256 on Wq, Wv 3,072
    (r + C per layer: its frozen shared pair, 65,536 numbers, trains nothing; r=896 would match LoRA's 8,192 at
    fourteen times the cost of each adapted layer's own product). LoRA+ is LoRA as above with B learning at
    loraplus_ratio times A's rate (the paper's recommended lambda = 2^4)."""

    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(r=4, alpha=8.0))
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    prefix_mlp: PrefixConfig = field(default_factory=lambda: PrefixConfig(reparameterize=True))
    prompt: PromptConfig = field(default_factory=PromptConfig)
    vera: VeRAConfig = field(default_factory=lambda: VeRAConfig(r=256))
    loraplus_ratio: float = 16.0
    nf4: NF4Config = field(default_factory=NF4Config)      # QLoRA's base: 4-bit, blocks of 64, double quantised

    def __post_init__(self):
        ratio = self.loraplus_ratio
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio < float("inf"):
            raise ValueError("MethodSettings.loraplus_ratio (LoRA+'s lambda = eta_B / eta_A) must be a finite number "
                             f"> 0; got {ratio!r}")


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
    "vera": lambda model, settings, seed: apply_vera(model, settings.vera, seed=seed),
    "loraplus": lambda model, settings, seed: apply_lora(model, loraplus_config(settings), seed=seed),
    "dora": lambda model, settings, seed: apply_lora(model, dora_config(settings), seed=seed),
    # QLoRA: the base to 4-bit NF4 first, then the "lora" part adapts it
    "nf4": lambda model, settings, seed: quantize_base(model, settings.nf4.block_size, settings.nf4.double_quant),
}


def loraplus_config(settings: MethodSettings) -> LoRAConfig:
    """LoRA+'s adapters: settings.lora with loraplus_ratio = settings.loraplus_ratio (train.fit then gives lora_B
    that multiple of the learning rate). A ratio already on settings.lora must agree (a ValueError otherwise)."""
    own = settings.lora.loraplus_ratio
    if own is not None and own != settings.loraplus_ratio:
        raise ValueError(f"LoRA+ ratio given twice: settings.lora.loraplus_ratio={own!r} and settings."
                         f"loraplus_ratio={settings.loraplus_ratio!r}; set one (MethodSettings.loraplus_ratio)")
    return replace(settings.lora, loraplus_ratio=settings.loraplus_ratio)


# the settings a part applies where they are not the MethodSettings field named after it (a fine-tune's run
# record holds each part's settings, so that resuming with other settings is refused)
def dora_config(settings: MethodSettings) -> LoRAConfig:
    """DoRA's adapters: settings.lora (its rank, targets and scale) with use_dora, so that DoRA and LoRA differ
    only by the magnitude."""
    return replace(settings.lora, use_dora=True)


PART_SETTINGS = {"loraplus": loraplus_config, "dora": dora_config}


def part_settings(settings: MethodSettings, part: str):
    """What sizes ``part`` (one of PARTS) under ``settings``: a dataclass, or None where the part has no size."""
    return PART_SETTINGS[part](settings) if part in PART_SETTINGS else getattr(settings, part, None)


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
        "parameters": sum(p.data.nbytes for p in model.parameters())
        + sum(w.nbytes for _, m in model.named_modules() for w in m.packed_weights().values()),   # 4-bit bases
        "gradients": sum(p.data.nbytes for p in trainable),
        "optimizer": 2 * sum(p.data.nbytes for p in trainable),
        "activations": activations,
    }
    memory["total"] = sum(memory.values())
    return memory
