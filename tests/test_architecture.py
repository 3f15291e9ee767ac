"""The house rules, checked on the source: subpackages that are layers and a one-way import graph, both as
docs/architecture.md describes them, one module that owns DeepSpeed, family knowledge only in model/families/, and
short functions."""
import ast
import functools
import re
from pathlib import Path

from lvlm_region.model import families

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "lvlm_region"


def module_name(f: Path) -> str:
    parts = list(f.relative_to(PKG).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


@functools.cache
def sources() -> dict[str, ast.Module]:
    return {module_name(f): ast.parse(f.read_text()) for f in sorted(PKG.rglob("*.py"))}


def imports(name: str, tree: ast.Module) -> set[str]:
    """Package modules ``name`` imports anywhere in its body (function-level imports included)."""
    is_package = (PKG / name.replace(".", "/") / "__init__.py").is_file()
    package = name.split(".") if is_package else name.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            anchor = package[:len(package) - node.level + 1]
            if node.module:
                out.add(".".join(anchor + node.module.split(".")))
            else:
                out.update(".".join(anchor + [a.name]) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lvlm_region."):
            out.add(node.module.removeprefix("lvlm_region."))
    return {m for m in out if m != name}


def layers() -> dict[str, int]:
    """module -> its layer inside its subpackage, from docs/architecture.md's module map
    (rows: | layer | `module` | what it does |)."""
    text = (ROOT / "docs" / "architecture.md").read_text().split("Inside each subpackage")[-1]
    rows = re.findall(r"^\| (\d+) \| `([\w.*]+)` \|", text, re.M)
    assert rows, "docs/architecture.md has no module map"
    found = {}
    for layer, mod in rows:
        assert mod not in found, f"{mod} is listed twice in docs/architecture.md"
        found[mod] = int(layer)
    return found


def subpackage_layers() -> dict[str, int]:
    """subpackage (or top-level module) -> its layer, from docs/architecture.md's first table
    (rows: | layer | `name/` or `name` | what goes there |, before the module map)."""
    text = (ROOT / "docs" / "architecture.md").read_text().split("Inside each subpackage")[0]
    rows = re.findall(r"^\| (\d+) \| `(\w+)/?` \|", text, re.M)
    assert rows, "docs/architecture.md has no subpackage table"
    return {name: int(layer) for layer, name in rows}


def subpackage(module: str) -> str:
    return module.split(".")[0]


def test_the_map_lists_every_module_and_every_import_points_down():
    trees, layer = sources(), layers()
    wildcards = {k[:-2]: layer.pop(k) for k in list(layer) if k.endswith(".*")}
    for prefix, value in wildcards.items():  # a module not listed by name (a new family, a new command)
        layer.update({m: value for m in trees if m.startswith(prefix + ".") and m not in layer})
    assert set(layer) == set(trees) - {"__init__"}, "docs/architecture.md must list every module, and only those"
    for name, tree in trees.items():
        for dep in imports(name, tree):
            dep = dep if dep in layer else dep.rsplit(".", 1)[0]  # `from .families import x` where x is a name
            if name != "__init__" and subpackage(dep) == subpackage(name):
                assert layer[dep] <= layer[name], \
                    f"{name} (layer {layer[name]}) imports {dep} (layer {layer[dep]}): imports must point down"


def test_every_subpackage_is_a_layer_and_imports_between_them_point_down():
    trees, order = sources(), subpackage_layers()
    assert {subpackage(m) for m in trees} - {"__init__"} == set(order), \
        "docs/architecture.md's subpackage table must list every subpackage and top-level module"
    assert list(order) == ["infra", "model", "config", "data", "train", "tools", "commands", "__main__"]
    wrong = []
    for name, tree in trees.items():
        if name == "__init__":
            continue
        for dep in imports(name, tree):
            if order[subpackage(dep)] > order[subpackage(name)]:
                wrong.append(f"{name} ({subpackage(name)}/, layer {order[subpackage(name)]}) imports {dep} "
                             f"({subpackage(dep)}/, layer {order[subpackage(dep)]})")
    assert wrong == []


def test_no_import_cycles():
    trees = sources()
    graph = {n: {d if d in trees else d.rsplit(".", 1)[0] for d in imports(n, t)} for n, t in trees.items()}

    def reaches(a, b, seen):
        for n in graph.get(a, ()):
            if n == b or (n not in seen and not seen.add(n) and reaches(n, b, seen)):
                return True
        return False

    assert sorted((a, b) for a in graph for b in graph[a] if reaches(b, a, set())) == []


def test_only_engine_touches_deepspeed_and_torch_distributed():
    offenders = []
    for name, tree in sources().items():
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n.startswith(("deepspeed", "torch.distributed")) for n in names) and name != "train.engine":
                offenders.append(f"{name}: {names}")
        if name != "train.engine" and re.search(r"\b(torch\.distributed|dist)\.\w+\(", ast.unparse(tree)):
            offenders.append(f"{name} calls torch.distributed")
    assert offenders == []


def test_family_names_appear_only_in_families():
    """No model_type of a registered family as a string outside families/ (no `== "qwen2_vl"` checks)."""
    types = set(families.REGISTRY)
    found = [(name, node.value) for name, tree in sources().items() if not name.startswith("model.families")
             for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value in types]
    assert found == []


# Config attributes and tensor keys that belong to one family (or one kind of LLM): its families/ module owns them
# (Family / ImageLayout methods, families.LAYER_FIELDS), so adding a family is one file.
FAMILY_ATTRIBUTES = ("spatial_merge_size", "temporal_patch_size", "num_position_embeddings", "image_grid_thw",
                     "image_sizes", "batch_num_images", "max_window_layers", "decoder_sparse_step", "mlp_only_layers")


def test_family_attributes_appear_only_in_families():
    """No family attribute outside families/: not read (``v.spatial_merge_size``), not named (``"image_grid_thw"``,
    ``hasattr(v, "spatial_merge_size")``)."""
    found = [(name, node.attr if isinstance(node, ast.Attribute) else node.value)
             for name, tree in sources().items() if not name.startswith("model.families") for node in ast.walk(tree)
             if (isinstance(node, ast.Attribute) and node.attr in FAMILY_ATTRIBUTES)
             or (isinstance(node, ast.Constant) and node.value in FAMILY_ATTRIBUTES)]
    assert found == []


def test_no_function_over_100_lines():
    long = [(name, n.name, n.end_lineno - n.lineno + 1) for name, tree in sources().items() for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 100]
    assert long == []


def test_every_family_module_is_registered():
    """Adding a family is adding its module to families/ (the registry finds it); the trainable ones come first."""
    mods = {f.stem for f in (PKG / "model" / "families").glob("*.py")} - {"__init__", "base"}
    registered = {type(f).__module__.rsplit(".", 1)[1] for f in families.FAMILIES}
    assert registered == mods
    assert families.trainable() == ["gemma3", "idefics3", "internvl", "llava", "llava_next", "llava_onevision",
                                    "qwen2_vl", "qwen2_5_vl", "qwen3_5", "qwen3_5_moe", "qwen3_vl", "qwen3_vl_moe",
                                    "smolvlm"]
    assert set(families.REGISTRY) == {"llava", "qwen2_vl", "qwen2_5_vl", "llava_next", "llava_onevision",
                                      "paligemma", "gemma3", "idefics3", "qwen3_vl", "qwen3_vl_moe", "qwen3_5",
                                      "qwen3_5_moe", "internvl", "smolvlm"}
