"""Adapter files in PEFT's format: ``adapter_model.safetensors`` plus ``adapter_config.json``.

Tensor names are PEFT's: ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` for Linear,
Conv1D and Conv2d, ``.lora_embedding_A`` / ``.lora_embedding_B`` for Embedding, so ``PeftModel.from_pretrained``
loads what ``save_adapter`` writes, and ``load_adapter`` loads what PEFT's ``save_pretrained`` writes.

Safety:

- Only safetensors is read; nothing is ever unpickled (an ``adapter_model.bin`` is refused).
- ``save_adapter`` writes each file to a temporary name in the same folder, fsyncs it and renames it over the
  old one, so an interrupted save leaves every file either whole-old or whole-new, never half-written. The files
  get the permissions the user's umask gives, like any other file the process creates.
- fastlora records in the safetensors metadata a SHA-256 over every tensor's name, dtype, shape and bytes, and
  the config values the numbers depend on (r, lora_alpha, use_rslora, rank_pattern, alpha_pattern). A file whose
  tensors or config disagree with that record (damaged, edited, or two files from different saves) is refused;
  a file without the record (PEFT's, or one re-saved without its metadata) loads with a warning saying so.
  The checksum detects damage, it is not a signature: whoever can rewrite the file can rewrite the checksum.
- ``load_adapter`` parses and checks every key, dtype, shape and value before it changes the model; when it
  raises, the model is exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import warnings
from collections import Counter

import torch
import torch.nn as nn
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from fastlora import experts as _experts
from fastlora.checks import check_alpha, check_dropout, check_rank
from fastlora.distributed import full_tensor, full_tensors, is_sharded
from fastlora.distributed import is_main_process as _is_main_process
from fastlora.kinds import kind_for_module, kind_of_layer, kinds
from fastlora.layers import DEFAULT_ADAPTER, LoRALayer
from fastlora.model import (
    BIAS_MODES,
    ModulesToSave,
    active_adapter,
    adapter_names,
    adapter_record,
    install_layers,
    lora_layers,
    mark_trainable,
    name_matches,
    pattern_value,
    saved_modules,
    set_adapter,
    unsupported_config_fields,
    unsupported_reason,
)
from fastlora.peft import peft_model_of

__all__ = ["lora_state_dict", "save_adapter", "load_adapter", "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
_SUM_KEY = "fastlora.sha256"
_LORA_KEY = "fastlora.lora"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Config fields that are layer options (from_module's keyword arguments), with the key suffix of the tensor that a
# layer built with the option holds.
_OPTION_FIELDS = {"use_dora": "lora_magnitude_vector", "lora_bias": "lora_B.bias"}


def lora_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor one adapter (default: the active one) trains, under PEFT's names (detached, not copied).

    Keys: ``base_model.model.<path>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r] (Conv2d: [r, C, kh, kw]
    and [O, r/groups, 1, 1]); for embeddings ``.lora_embedding_A`` [r, V] and ``.lora_embedding_B`` [D, r]; a DoRA
    magnitude, a lora_B bias; each modules_to_save copy's tensors under the module's own name
    (``base_model.model.lm_head.weight``); the biases its ``bias`` mode trains (an adapted layer's as
    ``<path>.base_layer.bias``). Paths are relative to the user's model. For a PEFT ``PeftModel`` this is PEFT's
    ``get_peft_model_state_dict`` of the adapter (the same key format). Sharded tensors (FSDP2, DeepSpeed ZeRO-3)
    are gathered whole, so under either every rank must call it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    peft_model = peft_model_of(model, "lora_state_dict")
    if peft_model is not None:
        from peft import get_peft_model_state_dict

        adapter = adapter_name or peft_model.active_adapter
        whole = _gathered(_peft_saved_tensors(peft_model, [adapter]))
        return get_peft_model_state_dict(peft_model, state_dict=whole, adapter_name=adapter)
    return {key: full_tensor(t) for key, t in _adapter_tensors(model, adapter_name or active_adapter(model)).items()}


def _adapter_tensors(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """lora_state_dict's tensors themselves (the Parameter objects, and a modules_to_save copy's buffers)."""
    out = {}
    layers = [(name, layer) for name, layer in lora_layers(model) if adapter in layer.adapters()]
    for name, layer in layers:
        holder = layer.adapter(adapter)
        for attr, suffix in kind_of_layer(layer).peft_keys.items():
            t = holder._parameters.get(attr)
            if t is not None:
                out[f"{PREFIX}{name}.{suffix}"] = t
    wrappers = saved_modules(model)
    for name, wrapper in wrappers:
        if adapter in wrapper.copies:
            copy = wrapper.copies[adapter]
            tensors = dict(copy.named_parameters(remove_duplicate=False)) | dict(copy.named_buffers())
            out.update({f"{PREFIX}{name}.{key}": t for key, t in tensors.items()})
    out.update(_experts.state_dict(model, PREFIX, adapter))  # LoRA on experts (fastlora.experts)
    mode = adapter_record(model).get(adapter, {}).get("bias", "none")
    if mode != "none":
        adapted = {name for name, _ in layers}
        inside = tuple(f"{name}." for name, _ in wrappers)
        for key, p in model.named_parameters():
            owner, _, last = key.rpartition(".")
            if last != "bias" or key.startswith(inside) or (mode == "lora_only" and owner not in adapted):
                continue
            out[f"{PREFIX}{owner}.base_layer.bias" if owner in adapted else f"{PREFIX}{key}"] = p
    return out


def _peft_saved_tensors(peft_model, adapters) -> dict[str, torch.Tensor]:
    """{state dict key: the tensor itself} of every entry PEFT saves for ``adapters`` of a PeftModel (its
    ``get_peft_model_state_dict`` picks them): Parameters as they are, sharded ones still sharded."""
    from peft import get_peft_model_state_dict

    state = peft_model.state_dict(keep_vars=True)
    picked = {
        id(t): key
        for name in adapters
        for key, t in get_peft_model_state_dict(peft_model, state_dict=state, adapter_name=name).items()
    }
    out = {key: t for key, t in state.items() if id(t) in picked}
    kept = {id(t) for t in out.values()}
    computed = [key for i, key in picked.items() if i not in kept]
    if computed and any(is_sharded(t) for t in out.values()):
        raise ValueError(
            f"PEFT computes {', '.join(computed[:3])} from the model's tensors, which are sharded (FSDP2 or ZeRO-3), "
            "so fastlora cannot gather them: gather the model's parameters before saving"
        )
    return out


def _gathered(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """``tensors`` gathered whole when any is sharded (FSDP2, ZeRO-3; a collective: every rank calls it with the
    same tensors), None when none is."""
    if not any(is_sharded(t) for t in tensors.values()):
        return None
    return dict(zip(tensors, full_tensors(tensors.values()), strict=True))


def _storage(t: torch.Tensor):
    """(data pointer, shape) of a tensor with storage of its own, or None (a DTensor has none)."""
    try:
        return t.data_ptr(), tuple(t.shape)
    except RuntimeError:
        return None


def _check_everything_trained_is_saved(model: nn.Module, saved: list[torch.Tensor]):
    """ValueError naming the parameters that train (requires_grad) but that no saved adapter holds."""
    ids = {id(t) for t in saved}  # fastlora's own tensors are the Parameters; PEFT's state dict holds views of them
    views = {_storage(t) for t in saved} - {None}
    lost = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in ids and _storage(p) not in views]
    if lost:
        raise ValueError(
            f"save_adapter: {', '.join(lost[:5])}{' and more' if len(lost) > 5 else ''} train (requires_grad) but no "
            "adapter holds them, so the saved files would lack them; freeze them, or train them as modules_to_save "
            "or through bias='all'/'lora_only'. Nothing was written"
        )


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _short_targets(root: nn.Module, names: list[str]) -> list[str]:
    """The last name components when they select exactly ``names`` (PEFT's list rule), else the full names."""
    short = sorted({n.rpartition(".")[2] for n in names})
    selected = {n for n, _ in root.named_modules() if n and name_matches(short, n)}
    return short if selected == set(names) else sorted(names)


def _scaling_fields(config: dict) -> dict:
    return {k: config.get(k) for k in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")}


def _adapter_config(root: nn.Module, found, task_type, base_model_name_or_path, experts=()) -> dict:
    """The adapter_config.json of the layers ``found`` and the expert adapters ``experts`` ((parameter key, entry)
    from fastlora.experts.config_entries: their keys are PEFT's target_parameters and pattern names)."""
    names = [name for name, _ in found]
    found = list(found) + list(experts)
    ranks = {name: layer.r for name, layer in found}
    alphas = {name: layer.lora_alpha for name, layer in found}
    rslora = {layer.use_rslora for _, layer in found}
    if len(rslora) > 1:
        raise ValueError("PEFT's adapter format has one use_rslora for all layers; this model mixes both settings")
    r, alpha = _most_common(ranks.values()), _most_common(alphas.values())
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(root, "config", None), "_name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": _short_targets(root, names),
        "lora_dropout": _most_common(getattr(layer, "lora_dropout", 0.0) for _, layer in found),
        "fan_in_fan_out": any(getattr(layer, "fan_in_fan_out", False) for _, layer in found),
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    # Newer PEFT fields are written only when they differ from their defaults, so older PEFT can read the file.
    rank_pattern = {_escape(n): v for n, v in ranks.items() if v != r}
    alpha_pattern = {_escape(n): v for n, v in alphas.items() if v != alpha}
    if rslora == {True}:
        config["use_rslora"] = True
    for key in _OPTION_FIELDS:
        values = {layer.extra_options().get(key, False) for _, layer in found}
        if values == {True}:
            config[key] = True
        elif True in values:
            raise ValueError(
                f"PEFT's adapter format has one {key} for all layers; this model has {key}=True on some layers only"
            )
    if rank_pattern:
        config["rank_pattern"] = rank_pattern
    if alpha_pattern:
        config["alpha_pattern"] = alpha_pattern
    if experts:
        if config["lora_dropout"]:
            raise ValueError("PEFT's adapter format has one lora_dropout, and target_parameters needs it to be 0")
        config["target_parameters"] = _experts.short_targets(root, [key for key, _ in experts])
    return config


def _escape(name: str) -> str:
    return name.replace(".", r"\.")


# ----------------------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------------------


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _write_file(path: str, data: bytes) -> str:
    """Writes ``data`` to a temporary file beside ``path`` and fsyncs it; returns the temporary name."""
    folder, base = os.path.split(path)
    tmp = os.path.join(folder, f".{base}.{secrets.token_hex(8)}.tmp")
    # Mode 0o666 before the umask, as open() gives every other file (tempfile.mkstemp would make it 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _fsync_dir(folder: str):
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(files: list[tuple[str, bytes]]):
    """Every file whole-new or whole-old: all are written and fsynced under temporary names, then renamed."""
    temps = []
    try:
        for path, data in files:
            temps.append((_write_file(path, data), path))
        while temps:
            tmp, path = temps[0]
            os.replace(tmp, path)
            temps.pop(0)
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
    _fsync_dir(os.path.dirname(files[0][0]))


def save_adapter(
    model: nn.Module,
    save_directory,
    task_type: str | None = None,
    base_model_name_or_path=None,
    is_main_process: bool | None = None,
):
    """Writes every adapter of the model's fastlora layers as ``adapter_model.safetensors`` + ``adapter_config.json``.

    The folder loads with ``PeftModel.from_pretrained(base_model, save_directory)`` and with ``load_adapter``.
    ``target_modules`` in the config lists the adapted modules (by their last name when that selects exactly
    them); per-module ranks and alphas that differ from the common one go to ``rank_pattern``/``alpha_pattern``.
    The adapter's ``modules_to_save`` copies and the biases its ``bias`` mode trains are saved with it, as PEFT
    does. With several adapters, PEFT's layout: "default" in the folder, every other one in a subfolder named after
    it. All files are replaced atomically (see the module docstring). Returns the folder path.

    Across processes (DDP, FSDP2, DeepSpeed ZeRO-3) call it on every rank: sharded adapter tensors are gathered
    (a collective) and only the main process writes (``is_main_process``, PEFT's argument; by default rank 0 of
    the default process group, or True when torch.distributed is not set up).
    """
    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"save_directory must be a path, got {type(save_directory).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    peft_model = peft_model_of(model, "save_adapter")
    if peft_model is not None:
        if task_type is not None or base_model_name_or_path is not None:
            raise ValueError(
                "save_adapter: a PEFT model saves the task_type and base_model_name_or_path of its own config; "
                "set them on peft_model.peft_config instead"
            )
        saved = _peft_saved_tensors(peft_model, list(peft_model.peft_config))
        _check_everything_trained_is_saved(peft_model, list(saved.values()))
        whole = _gathered(saved)  # PEFT's save_pretrained reads the model as it is: sharded tensors are not whole
        if _is_main_process() if is_main_process is None else is_main_process:
            peft_model.save_pretrained(save_directory, state_dict=whole)
        return os.fspath(save_directory)
    found = lora_layers(model)
    if not found and not _experts.has_adapters(model):
        raise ValueError(f"save_adapter: {type(model).__name__} has no fastlora LoRA layers to save")
    for name, layer in found:
        difference = kind_of_layer(layer).peft_difference(layer)
        if difference is not None:
            warnings.warn(
                f"fastlora: {name}: {difference}, so this adapter is exact only when loaded back with fastlora",
                stacklevel=2,
            )
    _check_everything_trained_is_saved(
        model, [t for name in adapter_names(model) for t in _adapter_tensors(model, name).values()]
    )
    files = []
    for adapter in adapter_names(model):
        folder = os.fspath(save_directory)
        if adapter != DEFAULT_ADAPTER:  # PEFT's layout: every adapter but "default" in a folder of its name
            folder = os.path.join(folder, adapter)
        files += _adapter_files(model, adapter, folder, task_type, base_model_name_or_path)
    if not (_is_main_process() if is_main_process is None else is_main_process):
        return os.fspath(save_directory)
    for path, _ in files:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    _atomic_write(files)
    return os.fspath(save_directory)


def _adapter_files(model, adapter, folder, task_type, base_model_name_or_path) -> list[tuple[str, bytes]]:
    """The two files of one adapter: (path, bytes) of its weights and its config."""
    holders = [(name, layer.adapter(adapter)) for name, layer in lora_layers(model) if adapter in layer.adapters()]
    experts = _experts.config_entries(model, adapter)
    record = adapter_record(model).get(adapter, {})
    if not holders and not experts:
        raise ValueError(f"save_adapter: adapter {adapter!r} is on no fastlora layer (only modules_to_save)")
    config = _adapter_config(model, holders, task_type or record.get("task_type"), base_model_name_or_path, experts)
    config["bias"] = record.get("bias", "none")
    config["modules_to_save"] = sorted(name for name, w in saved_modules(model) if adapter in w.copies) or None
    tensors = {k: v.cpu().contiguous().clone() for k, v in lora_state_dict(model, adapter).items()}
    metadata = {"format": "pt", _SUM_KEY: _digest(tensors), _LORA_KEY: json.dumps(_scaling_fields(config))}
    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    return [
        (os.path.join(folder, WEIGHTS_NAME), _st_save(tensors, metadata=metadata)),
        (os.path.join(folder, CONFIG_NAME), config_bytes),
    ]


# ----------------------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------------------


def _read_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is damaged or not an adapter config") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{path} is a {peft_type!r} adapter; fastlora loads only LoRA adapters (peft_type 'LORA')")
    refused = unsupported_config_fields(config)
    if refused:
        raise ValueError(f"{path} sets {', '.join(refused)}, which fastlora does not implement")
    if config.get("bias", "none") not in BIAS_MODES:
        raise ValueError(f"{path} sets bias={config['bias']!r}; expected one of {', '.join(BIAS_MODES)}")
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(t, str) and t for t in saved)):
        raise ValueError(f"{path}: modules_to_save must be a list of module names, got {saved!r}")
    if "r" not in config or "lora_alpha" not in config:
        raise ValueError(f"{path} lacks 'r' or 'lora_alpha'")
    check_rank(config["r"], f"{path}: r")
    check_alpha(config["lora_alpha"], f"{path}: lora_alpha")
    check_dropout(config.get("lora_dropout", 0.0) or 0.0, f"{path}: lora_dropout")
    if not isinstance(config.get("use_rslora", False), bool):
        raise ValueError(f"{path}: use_rslora must be true or false, got {config['use_rslora']!r}")
    for field, check in (("rank_pattern", check_rank), ("alpha_pattern", check_alpha)):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            raise ValueError(f"{path}: {field} must be an object, got {pattern!r}")
        for key, value in pattern.items():
            _check_regex(path, f"{field} key", key)
            check(value, f"{path}: {field}[{key!r}]")
    for field in ("target_modules", "exclude_modules"):
        spec = config.get(field)
        if isinstance(spec, str):
            _check_regex(path, field, spec)
        elif spec is not None and not (isinstance(spec, list) and all(isinstance(t, str) for t in spec)):
            raise ValueError(f"{path}: {field} must be a regex string or a list of names, got {spec!r}")
    if config.get("target_parameters"):
        spec = config["target_parameters"]
        if not (isinstance(spec, list) and all(isinstance(t, str) and t for t in spec)):
            raise ValueError(f"{path}: target_parameters must be a list of parameter names, got {spec!r}")
        refused = [k for k in ("lora_dropout", "use_dora", "lora_bias") if config.get(k)]
        if refused:
            raise ValueError(f"{path} sets target_parameters with {', '.join(refused)}, which PEFT refuses too")
    return config


def _check_regex(path: str, what: str, pattern):
    if not isinstance(pattern, str):
        raise ValueError(f"{path}: {what} must be a string, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{path}: {what} {pattern!r} is not a valid regular expression: {err}") from None


def _read_weights(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path} is truncated: {len(data)} bytes, too short for a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError(f"{path} is truncated: its header claims {n} bytes but the file has {len(data) - 8} after it")
    try:
        header = json.loads(data[8 : 8 + n])
        tensors = _st_load(data)
    except Exception as err:
        raise ValueError(f"{path} is not a valid safetensors file (truncated or damaged): {err}") from None
    metadata = header.get("__metadata__") or {} if isinstance(header, dict) else {}
    return tensors, metadata


def _verify_record(weights_path: str, config_path: str, tensors, metadata, config):
    if _SUM_KEY not in metadata:
        warnings.warn(
            f"fastlora: no checksum found in {weights_path} (PEFT saves none, and a file re-saved without its "
            "metadata loses fastlora's), so its integrity is not checked; keys, shapes and values still are",
            stacklevel=3,
        )
    elif _digest(tensors) != metadata[_SUM_KEY]:
        raise ValueError(
            f"{weights_path} fails its checksum: its tensors changed after fastlora saved them (damaged or edited)"
        )
    if _LORA_KEY in metadata:
        try:
            recorded = _normalise(json.loads(metadata[_LORA_KEY]))
        except (json.JSONDecodeError, TypeError, AttributeError):
            raise ValueError(f"{weights_path} has damaged fastlora metadata") from None
        current = _normalise(_scaling_fields(config))
        if recorded != current:
            diff = {k: (current[k], recorded[k]) for k in current if current[k] != recorded[k]}
            raise ValueError(
                f"{config_path} disagrees with the values recorded in {weights_path} (config vs record: {diff}); "
                "one file was edited, or the two files come from different saves"
            )


def _normalise(fields: dict) -> dict:
    """The scaling fields with PEFT's defaults filled in, so an absent field equals its default."""
    return {
        "r": fields.get("r"),
        "lora_alpha": fields.get("lora_alpha"),
        "use_rslora": bool(fields.get("use_rslora")),
        "rank_pattern": fields.get("rank_pattern") or {},
        "alpha_pattern": fields.get("alpha_pattern") or {},
    }


def _suffixes() -> dict[str, str]:
    """{key suffix: slot}: every adapter tensor suffix of the registered kinds (slot: the layer attribute), and the
    base tensors PEFT saves with some layers."""
    table = {f".{suffix}": attr for kind in kinds() for attr, suffix in kind.peft_keys.items()}
    table.update({".base_layer.weight": "base_weight", ".base_layer.bias": "base_bias"})
    return table


_BASE_SLOTS = ("base_weight", "base_bias")


def _group(tensors: dict[str, torch.Tensor], weights_path: str) -> dict[str, dict]:
    """{module path: {slot: tensor, ..., "keys": {slot: key}, "suffixes": the adapter key suffixes found}}."""
    suffixes = _suffixes()
    groups: dict[str, dict] = {}
    for key, t in tensors.items():
        path = key.removeprefix(PREFIX)
        found = [sfx for sfx in suffixes if path.endswith(sfx) and len(path) > len(sfx)]
        if not found:
            raise ValueError(f"{weights_path}: key {key!r} is not a LoRA tensor fastlora can load")
        suffix = max(found, key=len)
        module, slot = path[: -len(suffix)], suffixes[suffix]
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{weights_path}: {key} is {t.dtype}, expected a floating point tensor")
        if not torch.isfinite(t).all():
            raise ValueError(f"{weights_path}: {key} holds NaN or Inf")
        entry = groups.setdefault(module, {"keys": {}, "suffixes": set()})
        if slot not in _BASE_SLOTS:
            entry["suffixes"].add(suffix[1:])
        entry[slot] = t
        entry["keys"][slot] = key
    for module, entry in groups.items():
        if not entry["suffixes"]:
            continue
        for slot in ("lora_A", "lora_B"):
            if slot not in entry:
                present = ", ".join(sorted(entry["keys"].values()))
                raise ValueError(f"{weights_path}: module {module} has {present} but no {slot} tensor")
    return groups


def _adapter_slots(entry: dict) -> list[str]:
    return [slot for slot in entry["keys"] if slot not in _BASE_SLOTS]


def _check_kind(weights_path, module_path, entry, kind, type_name):
    foreign = sorted(entry["suffixes"] - set(kind.peft_keys.values()))
    if foreign:
        raise ValueError(
            f"{weights_path}: {module_path} has {', '.join(foreign)} tensors, which do not fit its {type_name}"
        )


def _check_shape(weights_path, entry, slot, expected):
    t = entry[slot]
    if expected is None:
        raise ValueError(f"{weights_path}: {entry['keys'][slot]} has no counterpart in the model's layer")
    if tuple(t.shape) != tuple(expected):
        raise ValueError(
            f"{weights_path}: {entry['keys'][slot]} has shape {tuple(t.shape)}, the model needs {tuple(expected)} "
            "(the adapter was made for another model or another rank)"
        )


def load_adapter(model: nn.Module, load_directory, adapter_name: str | None = None) -> nn.Module:
    """Loads an adapter that fastlora or PEFT saved into ``model``, applying LoRA first where needed.

    Modules named in the file that are plain ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding`` / ``nn.Conv2d`` are
    wrapped with the file's rank and alpha (``rank_pattern``/``alpha_pattern`` honoured) and everything else is
    frozen, as ``apply_lora`` does; modules that already are fastlora layers get the file's tensors, alpha,
    use_rslora and dropout. Base tensors PEFT saves with a targeted embedding (``base_layer.weight``) are copied
    into the base weight, as PEFT does; the config's ``modules_to_save`` modules get the file's copy (wrapped as
    ``ModulesToSave`` where they are plain) and its ``bias`` mode's biases are copied in.

    ``adapter_name``: the adapter to fill (one the model has; default the active one), or the name of the first
    adapter of a model that has none (default "default"). A folder of PEFT's layout holds "default" and a
    subfolder per other adapter: load each subfolder with its name.

    ``load_directory`` is the adapter folder, or the path of one of its two files (then their folder is loaded).
    Everything is checked first (the config's type and options, the file's integrity, every key, dtype, shape and
    value); any problem raises ValueError/TypeError naming the file and key, and the model is left as it was.
    A file without fastlora's checksum (PEFT's, or one re-saved without its metadata) loads with a warning.
    Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(load_directory, (str, os.PathLike)):
        raise TypeError(f"load_directory must be a path, got {type(load_directory).__name__}")
    folder = os.fspath(load_directory)
    if os.path.isfile(folder) and os.path.basename(folder) in (WEIGHTS_NAME, CONFIG_NAME):
        folder = os.path.dirname(folder) or "."  # one of the adapter's files: load the folder that holds it
    elif os.path.isfile(folder):
        raise ValueError(
            f"{folder} is a file; pass the folder that holds {WEIGHTS_NAME} and {CONFIG_NAME} (an adapter folder)"
        )
    weights_path, config_path = os.path.join(folder, WEIGHTS_NAME), os.path.join(folder, CONFIG_NAME)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} is missing; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    if not os.path.isfile(weights_path):
        if os.path.isfile(os.path.join(folder, "adapter_model.bin")):
            raise ValueError(
                f"{folder} holds adapter_model.bin (a pickle); fastlora loads only {WEIGHTS_NAME} and never unpickles. "
                "Convert it once, in a trusted environment, with PEFT's save_pretrained(safe_serialization=True)"
            )
        raise FileNotFoundError(f"{weights_path} is missing")
    peft_model = peft_model_of(model, "load_adapter")
    if peft_model is not None:
        adapter = peft_model.active_adapter
        trainable = not peft_model.peft_config[adapter].inference_mode
        peft_model.load_adapter(folder, adapter_name=adapter, is_trainable=trainable)
        return model
    config = _read_config(config_path)
    tensors, metadata = _read_weights(weights_path)
    _verify_record(weights_path, config_path, tensors, metadata, config)
    if not tensors:
        raise ValueError(f"{weights_path} holds no tensors")
    held = adapter_names(model)
    adapter = adapter_name or (active_adapter(model) if held else DEFAULT_ADAPTER)
    if held and adapter not in held:
        raise ValueError(
            f"load_adapter: the model has no adapter {adapter!r} (its adapters: {held}); add it with fl.add_adapter "
            "first, or load into one of those"
        )
    previous = active_adapter(model) if held else adapter
    if previous != adapter:
        set_adapter(model, adapter)
    try:
        _load(model, adapter, config, tensors, metadata, weights_path, config_path, bool(held))
    finally:
        if previous != adapter:
            set_adapter(model, previous)
    return model


def _saved_module_tensors(root: nn.Module, config: dict, tensors: dict, weights_path: str):
    """Splits off the tensors of the config's modules_to_save modules and of the biases its bias mode saves:
    ({module path: {key in the module: tensor}}, {parameter path: bias tensor}, the LoRA tensors left)."""
    names = config.get("modules_to_save") or []
    paths = [n for n, m in root.named_modules() if n and (isinstance(m, ModulesToSave) or name_matches(names, n))]
    paths = [n for n in paths if not any(n.startswith(other + ".") for other in paths)]
    saved, biases, rest = {}, {}, {}
    for key, t in tensors.items():
        path = key.removeprefix(PREFIX)
        owner = next((p for p in paths if path.startswith(p + ".")), None)
        if owner is not None:
            saved.setdefault(owner, {})[path[len(owner) + 1 :]] = t
        elif (
            config.get("bias") == "all"
            and path.endswith(".bias")
            and not path.endswith((".lora_B.bias", ".base_layer.bias"))
        ):
            biases[path] = t
        else:
            rest[key] = t
    for owner in paths:
        module = root.get_submodule(owner)
        reference = module.original_module if isinstance(module, ModulesToSave) else module
        expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in saved.get(owner, {}).items()}
        if got != expected:
            raise ValueError(
                f"{weights_path}: the modules_to_save module {owner} needs tensors {expected}, the file has {got}"
            )
    for path, t in biases.items():
        target = root.get_parameter(path) if _has_parameter(root, path) else None
        if target is None or tuple(target.shape) != tuple(t.shape):
            have = None if target is None else tuple(target.shape)
            raise ValueError(f"{weights_path}: bias {path} has shape {tuple(t.shape)}, the model's is {have}")
    return saved, biases, rest


def _has_parameter(root: nn.Module, path: str) -> bool:
    try:
        root.get_parameter(path)
    except AttributeError:
        return False
    return True


def _load(root, adapter, config, tensors, metadata, weights_path, config_path, has_adapters: bool):
    saved, biases, tensors = _saved_module_tensors(root, config, tensors, weights_path)
    groups = _group(tensors, weights_path) if tensors else {}
    expert_targets, expert_fills = _expert_groups(root, config, groups, weights_path, config_path)
    made_by_fastlora = _SUM_KEY in metadata
    r0, alpha0 = config["r"], config["lora_alpha"]
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    to_wrap, to_fill = [], []
    for path, entry in groups.items():
        if not entry["suffixes"]:
            raise ValueError(f"{weights_path}: {path} has base_layer tensors but no LoRA tensors")
        try:
            module = root.get_submodule(path)
        except AttributeError:
            raise ValueError(
                f"{weights_path}: {entry['keys']['lora_A']} names module {path!r}, which {type(root).__name__} "
                "does not have"
            ) from None
        r = pattern_value(rank_pattern, path, r0)
        alpha = pattern_value(alpha_pattern, path, alpha0)
        a = entry["lora_A"]
        if a.dim() == 0 or a.shape[0] != r:
            raise ValueError(
                f"{weights_path}: {entry['keys']['lora_A']} has shape {tuple(a.shape)}, but {config_path} gives "
                f"{path} rank r={r}"
            )
        if isinstance(module, LoRALayer):
            kind = kind_of_layer(module)
            _check_kind(weights_path, path, entry, kind, type(module).__name__)
            if module.merged:
                raise ValueError(f"load_adapter: {path} is merged; unmerge it (or fl.unload the model) before loading")
            options = _file_options(weights_path, config_path, config, path, entry, kind)
            have = {key: module.extra_options()[key] for key in options}
            if options != have:
                raise ValueError(
                    f"load_adapter: the adapter in {weights_path} has {options} for {path}, whose layer has {have}"
                )
            shapes = {
                slot: tuple(t.shape) for slot in _adapter_slots(entry) if (t := getattr(module, slot, None)) is not None
            }
            to_fill.append((path, module, entry, alpha))
        else:
            parent = root.get_submodule(path.rpartition(".")[0]) if "." in path else root
            reason = unsupported_reason(path, module, parent)
            if reason is not None:
                raise ValueError(f"{weights_path}: cannot put LoRA on {path}: {reason}")
            kind = kind_for_module(module)
            _check_kind(weights_path, path, entry, kind, type(module).__name__)
            options = _file_options(weights_path, config_path, config, path, entry, kind)
            shapes = kind.layer_class.adapter_shapes(module, r, **options)
            to_wrap.append((path, module, entry, r, alpha, options))
        for slot in _adapter_slots(entry):
            _check_shape(weights_path, entry, slot, shapes.get(slot))
        difference = kind.peft_difference(module)
        if difference is not None and not made_by_fastlora:
            raise ValueError(
                f"{weights_path}: {path}: {difference}, and this adapter was not saved by fastlora, so loading it "
                "would change its meaning"
            )
        for slot in ("base_weight", "base_bias"):
            if slot in entry:
                target = getattr(module, "weight" if slot == "base_weight" else "bias", None)
                if target is None or tuple(target.shape) != tuple(entry[slot].shape):
                    have = None if target is None else tuple(target.shape)
                    raise ValueError(
                        f"{weights_path}: {entry['keys'][slot]} has shape {tuple(entry[slot].shape)}, the model's is "
                        f"{have}"
                    )

    _check_coverage(root, config, groups, weights_path, config_path)

    with torch.no_grad():
        new = install_layers(root, [(p, m, r, a, o) for p, m, _, r, a, o in to_wrap], dropout, use_rslora)
        for path, _, entry, _, alpha, _ in to_wrap:
            new[path].active_adapter = adapter
            _fill(new[path], entry, alpha, use_rslora, dropout)
        for _, layer, entry, alpha in to_fill:
            _fill(layer, entry, alpha, use_rslora, dropout)
        settings = {key: (r, alpha) for _, key, _, r, alpha in expert_fills}
        _experts.install(root, expert_targets, settings, use_rslora, adapter)
        for name, _, entry, _, alpha in expert_fills:
            _experts.fill(root.get_submodule(name), entry["lora_A"], entry["lora_B"], alpha, use_rslora)
        wrapped = bool(expert_targets)
        for path, state in saved.items():
            module = root.get_submodule(path)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module, adapter)
                root.set_submodule(path, module)
                wrapped = True
            elif adapter not in module.copies:
                module.add_copy(adapter)
                wrapped = True
            module.copies[adapter].load_state_dict(state)
        for path, t in biases.items():
            root.get_parameter(path).copy_(t)
    record = adapter_record(root)
    if adapter not in record or to_wrap or wrapped:
        record[adapter] = {
            "bias": config.get("bias", "none"),
            "modules_to_save": sorted(saved) or None,
            "task_type": config.get("task_type"),
        }
    if not has_adapters:
        root.__dict__["_fastlora_active"] = adapter
    if to_wrap or wrapped or config.get("bias", "none") != "none":
        mark_trainable(root)


def _expert_groups(root: nn.Module, config: dict, groups: dict, weights_path: str, config_path: str):
    """Take the expert adapters (PEFT's target_parameters) out of ``groups`` and check them: returns (the experts
    targets to wrap, [(wrapper name, parameter key, entry, r, alpha)] to fill). Every parameter the config targets
    must have its two tensors in the file, in the shapes of its wrapper."""
    spec = config.get("target_parameters")
    existing = {name: _experts.parameter_key(name, w) for name, w in _experts.adapters(root)}
    targets = []
    if spec:
        try:
            targets = _experts.select_parameters(root, spec, skip_wrapped=True)
        except ValueError as err:
            raise ValueError(f"{config_path}: {err}") from None
    planned = _experts.plan_names(targets)
    fills = []
    for name, key in {**existing, **planned}.items():
        entry = groups.pop(name, None)
        if entry is None:
            if spec and (name in planned or _experts.matches(key, spec)):
                raise ValueError(
                    f"{config_path} targets the expert parameter {key}, but {weights_path} has no tensors for it "
                    "(a truncated or edited file, or an adapter made for another model)"
                )
            continue
        foreign = sorted(entry["suffixes"] - {"lora_A.weight", "lora_B.weight"})
        foreign += [slot for slot in ("base_weight", "base_bias") if slot in entry]
        if foreign:
            raise ValueError(f"{weights_path}: {name} (LoRA on the expert parameter {key}) has {foreign} tensors")
        r = pattern_value(config.get("rank_pattern") or {}, key, config["r"])
        alpha = pattern_value(config.get("alpha_pattern") or {}, key, config["lora_alpha"])
        shapes = _experts.expected_shapes(root, name, key, r)
        for slot in ("lora_A", "lora_B"):
            _check_shape(weights_path, entry, slot, shapes[slot])
        fills.append((name, key, entry, r, alpha))
    return targets, fills


def _file_options(weights_path, config_path, config, path, entry, kind) -> dict:
    """The layer options of one module, from the config (use_dora, lora_bias) and checked against the file's keys."""
    options = {}
    for key, suffix in _OPTION_FIELDS.items():
        if key not in kind.layer_class.options:
            continue  # a tensor for it would not fit the kind (_check_kind)
        on, present = bool(config.get(key)), suffix in entry["suffixes"]
        if on != present:
            raise ValueError(
                f"{config_path} has {key}={on}, but {weights_path} {'has' if present else 'lacks'} {path}.{suffix}"
            )
        options[key] = on
    return options


def _check_coverage(root: nn.Module, config: dict, groups: dict, weights_path: str, config_path: str):
    """Every module the config targets must have tensors in the file (a file cut short loses whole modules)."""
    targets, exclude = config.get("target_modules"), config.get("exclude_modules")
    if config.get("layers_to_transform") is not None or not isinstance(targets, (str, list)):
        return
    if isinstance(targets, str) and targets.lower() == "all-linear":
        return
    expected = {
        name
        for name, m in root.named_modules()
        if name
        and (isinstance(m, LoRALayer) or kind_for_module(m) is not None)
        and name_matches(targets, name)
        and not name_matches(exclude, name)
    }
    missing = sorted(expected - set(groups))
    if missing:
        raise ValueError(
            f"{config_path} targets {missing[:4]}{' and more' if len(missing) > 4 else ''}, but {weights_path} has "
            "no tensors for them (a truncated or edited file, or an adapter made for another model)"
        )


def _fill(layer: LoRALayer, entry: dict, alpha, use_rslora: bool, dropout: float):
    for slot in _adapter_slots(entry):
        getattr(layer, slot).copy_(entry[slot])
    layer.lora_alpha = alpha
    layer.use_rslora = use_rslora
    if layer.uses_dropout:
        layer.lora_dropout = dropout
    if "base_weight" in entry:
        layer.weight.copy_(entry["base_weight"])
    if "base_bias" in entry:
        layer.bias.copy_(entry["base_bias"])
