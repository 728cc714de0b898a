"""Oracle for the LyCORIS decoders: files written by lycoris-lora 4.1.3 and the outputs its
training-time forward computes for them.

Truth is the forward of every wrapped layer in LyCORIS's default (rebuild) mode, recorded at
multipliers 1.0 and 0.7 on fixed probe inputs. LyCORIS's own merge helpers (`merge_to`,
`get_diff_weight`, `get_merged_weight`) are never used: they apply alpha/rank twice for
LoHa/LoKr (reference §5.3, §7.1).

Recipe (reference `lycoris-format.md` §5): reset the class-level presets, seed, create the
network, apply it, add N(0, 0.05^2) noise to every parameter with >= 1 dim (and set the 0-dim
`scalar`s to 1.3), optionally round the parameters to the save dtype, record the truth, save.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

BASE_TARGETS = ["Linear", "Conv2d"]
NORM_TARGETS = ["Linear", "LayerNorm", "GroupNorm"]
MULTIPLIERS = (1.0, 0.7)
NOISE = 0.05
SCALAR_VALUE = 1.3


# -- tiny models ------------------------------------------------------------------------------
class TinyModel(nn.Module):
    """Linear with and without bias, 3x3 and 1x1 convs (output dims factor cleanly)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 96)
        self.lin_nobias = nn.Linear(96, 64, bias=False)
        self.conv3 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv1 = nn.Conv2d(32, 48, 1)


class NormModel(nn.Module):
    """Norm layers (train_norm) next to a Linear (LoRA), so the file mixes two families."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 96)
        self.ln = nn.LayerNorm(96)
        self.gn = nn.GroupNorm(4, 32)


class TinyTLoRAModel(nn.Module):
    """T-LoRA works on Linear and 1x1 conv only in lycoris-lora 4.1.3 (k x k convs raise)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 96)
        self.lin_nobias = nn.Linear(96, 64, bias=False)
        self.conv1 = nn.Conv2d(32, 48, 1)


MODELS = {"tiny": (TinyModel, BASE_TARGETS), "norm": (NormModel, NORM_TARGETS),
          "tlora": (TinyTLoRAModel, ["Linear", "Conv2d"])}


def probe_input(layer: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(layer, nn.Linear):
        return torch.randn(5, layer.in_features, generator=g)
    if isinstance(layer, nn.Conv2d):
        return torch.randn(2, layer.in_channels, 7, 7, generator=g)
    if isinstance(layer, nn.LayerNorm):
        return torch.randn(5, *layer.normalized_shape, generator=g) * 2 + 0.5
    if isinstance(layer, nn.GroupNorm):
        return torch.randn(2, layer.num_channels, 7, 7, generator=g) * 2 + 0.5
    raise TypeError(f"no probe for {type(layer).__name__}")


# -- cases ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One LyCORIS file to produce.

    `kwargs` go to `create_lycoris` (or, with `direct=True`, to `LycorisNetwork(...)` as module
    kwargs: that is the only way to reach `rs_lora`). `preset` is merged into the
    `apply_preset` call made before construction (e.g. `name_algo_map`).
    """

    id: str
    algo: str
    dim: int = 8
    alpha: float = 4.0
    kwargs: dict = field(default_factory=dict)
    direct: bool = False
    preset: dict = field(default_factory=dict)
    save_dtype: torch.dtype | None = None
    metadata: dict = field(default_factory=dict)
    model: str = "tiny"
    seed: int = 0
    random_forward: bool = False  # DyLoRA: forward draws a random rank; no output truth

    @property
    def conv_dim(self) -> int:
        return int(self.kwargs.get("conv_dim", self.dim))

    @property
    def conv_alpha(self) -> float:
        return float(self.kwargs.get("conv_alpha", self.alpha))


def _args(**kw) -> dict:
    return {"ss_network_args": json.dumps({k: str(v) for k, v in kw.items()})}


CASES: dict[str, Case] = {c.id: c for c in [
    Case("lora", "lora"),
    Case("locon", "locon", kwargs={"conv_dim": 4, "conv_alpha": 2}),
    Case("locon_tucker", "locon", kwargs={"conv_dim": 4, "conv_alpha": 2, "use_tucker": True}),
    Case("lora_alpha0", "lora", alpha=0, kwargs={"conv_dim": 4, "conv_alpha": 0}),
    Case("lora_scalar", "lora", kwargs={"use_scalar": True}),
    Case("loha", "loha", kwargs={"conv_dim": 4, "conv_alpha": 2}),
    Case("loha_tucker", "loha", kwargs={"conv_dim": 4, "conv_alpha": 2, "use_tucker": True}),
    Case("loha_scalar", "loha", kwargs={"use_scalar": True}),
    Case("lokr_f4", "lokr", kwargs={"factor": 4, "conv_dim": 2, "conv_alpha": 1}),
    Case("lokr_default", "lokr", kwargs={"conv_dim": 4, "conv_alpha": 2}),
    Case("lokr_tucker", "lokr", kwargs={"factor": 4, "conv_dim": 2, "conv_alpha": 1, "use_tucker": True}),
    Case("lokr_scalar", "lokr", kwargs={"factor": 4, "use_scalar": True}),
    # "linear_dim 10000": both factors full; LyCORIS forces alpha = lora_dim, gamma = 1
    Case("lokr_full_matrix", "lokr", dim=10000, alpha=1,
         kwargs={"factor": 8, "full_matrix": True}, metadata={"ss_network_dim": "10000"}),
    Case("lokr_full_matrix_nometa", "lokr", dim=10000, alpha=1, kwargs={"factor": 8, "full_matrix": True}),
    Case("lokr_decompose_both", "lokr", dim=2, alpha=1, kwargs={"factor": 16, "decompose_both": True}),
    Case("lokr_unbalanced", "lokr", kwargs={"factor": 4, "unbalanced_factorization": True}),
    Case("ia3_output", "ia3"),
    Case("ia3_input", "ia3", preset={"name_algo_map": {"lin": {"train_on_input": True}}}),
    Case("glora", "glora", kwargs={"conv_dim": 4, "conv_alpha": 2}),
    Case("glora_scalar", "glora", kwargs={"use_scalar": True}),
    Case("full", "full"),
    Case("dora_lora_out", "lora", kwargs={"dora_wd": True, "wd_on_output": True, "conv_dim": 4, "conv_alpha": 2}),
    Case("dora_lora_in", "lora", kwargs={"dora_wd": True, "wd_on_output": False, "conv_dim": 4, "conv_alpha": 2}),
    Case("dora_loha", "loha", kwargs={"dora_wd": True, "conv_dim": 4, "conv_alpha": 2}),
    Case("dora_lokr", "lokr", kwargs={"dora_wd": True, "factor": 4, "conv_dim": 2, "conv_alpha": 1}),
    Case("rs_lora", "lora", direct=True, kwargs={"rs_lora": True, "conv_dim": 4, "conv_alpha": 2},
         metadata=_args(algo="lora", rs_lora=True)),
    Case("rs_loha", "loha", direct=True, kwargs={"rs_lora": True, "conv_dim": 4, "conv_alpha": 2},
         metadata=_args(algo="loha", rs_lora=True)),
    # conv1 ends up with both factors full: gamma = alpha_file / lora_dim needs ss_network_dim (§3.3)
    Case("rs_lokr", "lokr", direct=True, kwargs={"rs_lora": True, "factor": 4, "conv_dim": 2, "conv_alpha": 1},
         metadata={"ss_network_dim": "8", "ss_network_alpha": "4",
                   **_args(algo="lokr", rs_lora=True, factor=4, conv_dim=2, conv_alpha=1)}),
    Case("rs_lokr_full", "lokr", dim=16, alpha=4, direct=True,
         kwargs={"rs_lora": True, "factor": 8, "full_matrix": True, "conv_dim": 16, "conv_alpha": 4},
         metadata={"ss_network_dim": "16", **_args(algo="lokr", rs_lora=True, conv_dim=16, full_matrix=True)}),
    Case("rs_glora", "glora", direct=True, kwargs={"rs_lora": True, "conv_dim": 4, "conv_alpha": 2},
         metadata=_args(algo="glora", rs_lora=True)),
    Case("norms", "lora", kwargs={"train_norm": True}, model="norm"),
    Case("tlora", "tlora", model="tlora"),
    Case("lora_fp16", "lora", kwargs={"conv_dim": 4, "conv_alpha": 2}, save_dtype=torch.float16),
    Case("lora_bf16", "lora", kwargs={"conv_dim": 4, "conv_alpha": 2}, save_dtype=torch.bfloat16),
    Case("loha_fp16", "loha", kwargs={"conv_dim": 4, "conv_alpha": 2}, save_dtype=torch.float16),
    Case("loha_bf16", "loha", kwargs={"conv_dim": 4, "conv_alpha": 2}, save_dtype=torch.bfloat16),
    Case("lokr_fp16", "lokr", kwargs={"factor": 4, "conv_dim": 2, "conv_alpha": 1}, save_dtype=torch.float16),
    Case("lokr_bf16", "lokr", kwargs={"factor": 4, "conv_dim": 2, "conv_alpha": 1}, save_dtype=torch.bfloat16),
    Case("diag_oft", "diag-oft", alpha=0),
    Case("diag_oft_constraint", "diag-oft", alpha=0, kwargs={"constraint": 1e-3}),
    Case("diag_oft_rescaled", "diag-oft", dim=16, alpha=0, kwargs={"rescaled": True}),
    Case("diag_oft_bf16", "diag-oft", alpha=0, kwargs={"rescaled": True}, save_dtype=torch.bfloat16),
    Case("boft", "boft", alpha=0),
    Case("boft_rescaled_constraint", "boft", dim=16, alpha=0, kwargs={"rescaled": True, "constraint": 1e-3}),
    Case("dylora", "dylora", kwargs={"conv_dim": 4, "conv_alpha": 2, "block_size": 2}, random_forward=True),
]}

# Cases whose forward is the truth (DyLoRA draws a random rank on every call).
ORACLE_CASE_IDS = [c.id for c in CASES.values() if not c.random_forward]


# -- records ----------------------------------------------------------------------------------
@dataclass
class LayerRecord:
    name: str  # dotted path in the model
    lora_name: str  # module name in the file
    base_layer: nn.Module  # a copy of the layer before adaptation
    x: torch.Tensor
    y_base: torch.Tensor
    y: dict  # multiplier -> adapted output (LyCORIS rebuild forward)


@dataclass
class OracleCase:
    case: Case
    path: str
    base_model: nn.Module  # deepcopy taken before apply_to
    base_state_dict: dict
    layers: dict  # dotted path -> LayerRecord
    saved: dict  # the tensors as written (for shape checks)


def reset_presets(targets, extra: dict | None = None):
    from lycoris import LycorisNetwork

    LycorisNetwork.apply_preset({
        "target_module": list(targets), "target_name": [], "name_algo_map": {}, "module_algo_map": {},
        "exclude_name": [], "lora_prefix": "lycoris", "enable_conv": True, "use_fnmatch": False,
        **(extra or {}),
    })


def randomise(net: nn.Module, use_scalar: bool) -> None:
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() >= 1:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * NOISE)
            elif name.endswith("scalar") and use_scalar:
                p.fill_(SCALAR_VALUE)


def round_params(net: nn.Module, dtype) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(p.to(dtype).to(p.dtype))


def build_case(case: Case, directory, multipliers=MULTIPLIERS) -> OracleCase:
    from lycoris import LycorisNetwork, create_lycoris
    from safetensors.torch import load_file

    model_cls, targets = MODELS[case.model]
    reset_presets(targets, case.preset)
    torch.manual_seed(case.seed)
    model = model_cls()
    with torch.no_grad():  # non-trivial base biases / norm affines
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    base_model = copy.deepcopy(model)
    try:
        if case.direct:
            net = LycorisNetwork(
                model, 1.0, case.dim, case.conv_dim, case.alpha, case.conv_alpha,
                network_module=case.algo,
                **{k: v for k, v in case.kwargs.items() if k not in ("conv_dim", "conv_alpha")},
            )
        else:
            net = create_lycoris(model, 1.0, linear_dim=case.dim, linear_alpha=case.alpha,
                                 algo=case.algo, **case.kwargs)
            # create_lycoris re-applies the built-in preset; target_module etc. persist from above
        net.apply_to()
    finally:
        reset_presets(BASE_TARGETS)
    randomise(net, use_scalar=bool(case.kwargs.get("use_scalar")))
    if case.save_dtype is not None:
        round_params(net, case.save_dtype)
    net.eval()

    layers = {}
    modules = dict(model.named_modules())
    base_modules = dict(base_model.named_modules())
    for i, lora in enumerate(net.loras):
        path = next(n for n, m in modules.items() if m is lora.org_module[0])
        base_layer = base_modules[path]
        x = probe_input(base_layer, seed=100 + i)
        with torch.no_grad():
            y_base = base_layer(x)
            outputs = {}
            if not case.random_forward:
                for m in multipliers:
                    net.set_multiplier(m)
                    outputs[m] = modules[path](x).clone()
        layers[path] = LayerRecord(path, lora.lora_name, base_layer, x, y_base, outputs)

    os.makedirs(directory, exist_ok=True)
    file = os.path.join(str(directory), f"{case.id}.safetensors")
    net.save_weights(file, case.save_dtype, dict(case.metadata))
    base_state_dict = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    return OracleCase(case, file, base_model, base_state_dict, layers, load_file(file))


# -- comparison -------------------------------------------------------------------------------
def layer_output(record: LayerRecord, state_dict: dict) -> torch.Tensor:
    """The base layer run with the (merged) parameters found in `state_dict`."""
    layer = copy.deepcopy(record.base_layer)
    own = {k: state_dict[f"{record.name}.{k}"] for k in layer.state_dict()}
    layer.load_state_dict({k: v.to(torch.float32) for k, v in own.items()})
    with torch.no_grad():
        return layer(record.x)


def rel_error(y_ours: torch.Tensor, y_oracle: torch.Tensor, y_base: torch.Tensor) -> float:
    """||y_ours - y_oracle|| / ||y_oracle - y_base||: error relative to the adapter's effect."""
    effect = (y_oracle - y_base).norm()
    assert effect > 0, "the adapter does not change this layer; the case tests nothing"
    return float((y_ours.float() - y_oracle).norm() / effect)


# -- kohya naming ---------------------------------------------------------------------------
class CLIPMLP(nn.Module):  # class names are what lycoris.kohya's "full" preset targets
    def __init__(self, width):
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)


class CLIPAttention(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width, bias=False)


class TextEncoderL(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = CLIPAttention(16)
        self.mlp = CLIPMLP(16)


class TextEncoderG(nn.Module):
    """Different paths from TextEncoderL so a generic (path-only) match is unambiguous."""

    def __init__(self):
        super().__init__()
        self.attn_g = CLIPAttention(24)
        self.ff_g = CLIPMLP(24)


class Transformer2DModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Conv2d(8, 16, 1)
        self.to_q = nn.Linear(16, 16)
        self.proj_out = nn.Conv2d(16, 8, 3, padding=1)


class TinyUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.mid_block = Transformer2DModel()


@dataclass
class KohyaOracle:
    path: str
    components: dict  # "te1"/"te2"/"unet" -> base model copy
    layers: dict  # component -> {path: LayerRecord}


def build_kohya(directory, algo: str = "lora") -> KohyaOracle:
    from lycoris import kohya
    from lycoris.kohya import LycorisNetworkKohya

    torch.manual_seed(7)
    te1, te2, unet = TextEncoderL(), TextEncoderG(), TinyUNet()
    bases = {"te1": copy.deepcopy(te1), "te2": copy.deepcopy(te2), "unet": copy.deepcopy(unet)}
    net = kohya.create_network(1.0, 4, 2.0, None, [te1, te2], unet, algo=algo, conv_dim=4, conv_alpha=2)
    net.apply_to([te1, te2], unet, True, True)
    LycorisNetworkKohya.apply_preset({"name_algo_map": {}, "module_algo_map": {}})
    randomise(net, use_scalar=False)
    net.eval()
    live = {"te1": te1, "te2": te2, "unet": unet}
    layers = {c: {} for c in live}
    index = 0
    for lora in list(net.text_encoder_loras) + list(net.unet_loras):
        for comp, model in live.items():
            found = [n for n, m in model.named_modules() if m is lora.org_module[0]]
            if found:
                break
        path = found[0]
        base_layer = dict(bases[comp].named_modules())[path]
        x = probe_input(base_layer, seed=300 + index)
        index += 1
        with torch.no_grad():
            outputs = {}
            for m in MULTIPLIERS:
                net.set_multiplier(m)
                outputs[m] = dict(model.named_modules())[path](x).clone()
            layers[comp][path] = LayerRecord(path, lora.lora_name, base_layer, x, base_layer(x), outputs)
    os.makedirs(directory, exist_ok=True)
    file = os.path.join(str(directory), f"kohya_{algo}.safetensors")
    net.save_weights(file, None, {"ss_network_module": "lycoris.kohya"})
    return KohyaOracle(file, bases, layers)


def case_builder(directory, multipliers=MULTIPLIERS):
    """`get(case_id)`: the built `OracleCase` of `CASES[case_id]`, built once in `directory`
    (what a fixture hands its tests)."""
    built: dict[str, OracleCase] = {}

    def get(case_id: str) -> OracleCase:
        if case_id not in built:
            built[case_id] = build_case(CASES[case_id], directory, multipliers)
        return built[case_id]

    return get
