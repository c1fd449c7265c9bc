"""Meshes and the one place that maps names to mesh axes.

Mesh axes (a created mesh always has all four; an axis left out of the request has size 1):
  data    plain data parallelism: the batch is split, parameters are replicated
  fsdp    data parallelism that also splits the hidden dim of the big weights (gathered just in time by XLA)
  expert  expert parallelism: the experts are split, and so is the batch (expert parallelism borrows the data
          dimension, as in DeepSpeed-MoE and MaxText)
  tensor  heads, the expert width and the vocabulary are split; activations stay whole

Parameters carry logical names from where they are created (m1jax.layers.partitioning.named; the stacked
layer-group axis G of scanned layers is "layers"); one table, LOGICAL_AXIS_RULES, maps each name to mesh axes
("embed" -> ("fsdp",), "experts" -> ("expert",), ...). A parameter over UNNAMED_MAX_BYTES that has no names raises
ValueError naming it (nothing large is replicated by accident).
A dimension is sharded only when its size divides the product of its mesh axes, else it is replicated; the batch and
the experts are the exceptions: a mismatch there raises ValueError (before anything compiles).

Use: mesh = create_mesh({"data": 2, "expert": 4}); params = shard_params(params, mesh, param_logical_axes(config))
(the names the model gives, `m1jax.model.param_logical_axes`; this module does not import the model); inputs
placed with batch_sharding(mesh); the model built with the mesh, M1ForCausalLM(config, mesh=mesh), so that its MoE
layers dispatch expert-parallel (the mesh is passed, never picked up from `jax.set_mesh`; under an ambient mesh a
model built without one refuses to run); `with jax.set_mesh(mesh):` still lets `constrain` place activations.
"""
import math
from typing import Any, Iterable, Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "layers": (),           # stacked layer groups of nn.scan
    "length": (),
    "act_embed": (),        # hidden dim of activations
    "embed": ("fsdp",),     # hidden dim of weights
    "vocab": ("tensor",),
    "heads": ("tensor",),   # H * D (and the lightning layer's per-head [q | k | v])
    "kv_heads": ("tensor",),
    "experts": ("expert",),
    "expert_mlp": ("tensor",),  # expert width F
    "router": (),           # the router's E outputs
    "choices": (),          # top-k choices
    "norm": (),
}
MUST_DIVIDE = ("batch", "experts")
UNNAMED_MAX_BYTES = 1 << 20  # a parameter without logical names above this size is an error, not replicated


def create_mesh(axes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with the axes ("data", "fsdp", "expert", "tensor").

    axes: sizes by name, e.g. {"data": 2, "fsdp": 2, "expert": 2}; absent axes get 1; one axis may be -1 (the rest
    of the devices); None means {"data": -1}. The sizes must multiply to the number of devices. Axes are Auto (XLA
    propagates shardings).
    """
    axes = {"data": -1} if axes is None else dict(axes)
    unknown = sorted(set(axes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"create_mesh: unknown mesh axes {unknown}; use {MESH_AXES}")
    devices = list(jax.devices() if devices is None else devices)
    for name, size in axes.items():
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"create_mesh: axis '{name}' has size {size!r}; give a positive int (or -1 for the rest)")
    free = [name for name, size in axes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"create_mesh: only one axis may be -1, got {free}")
    fixed = math.prod(size for size in axes.values() if size != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(f"create_mesh: {len(devices)} devices cannot be split into axis '{free[0]}' times the "
                             f"other axes {axes} (product {fixed})")
        axes[free[0]] = len(devices) // fixed
    sizes = tuple(axes.get(name, 1) for name in MESH_AXES)
    if math.prod(sizes) != len(devices):
        raise ValueError(f"create_mesh: axes {dict(zip(MESH_AXES, sizes))} multiply to {math.prod(sizes)} but there "
                         f"are {len(devices)} devices; make the product equal the device count (or pass devices=)")
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def parse_mesh(text: str | None) -> dict[str, int] | None:
    """"data=2,fsdp=2,expert=2" (the command line's --mesh) -> {"data": 2, "fsdp": 2, "expert": 2}; None/"" -> None.
    Raises ValueError for an unknown axis, a size below 1, a malformed part or an axis given twice."""
    if not text:
        return None
    axes: dict[str, int] = {}
    for part in str(text).split(","):
        name, sep, size = (x.strip() for x in part.partition("="))
        if not sep or name not in MESH_AXES or not size.isdecimal() or not size.isascii() or int(size) < 1:
            raise ValueError(f"part {part!r}: write axis=size with an axis of {list(MESH_AXES)} and a size >= 1, "
                             "e.g. data=2,expert=4")
        if name in axes:
            raise ValueError(f"axis {name!r} given twice in {text!r}")
        axes[name] = int(size)
    return axes


def axis_size(mesh: Mesh | jax.sharding.AbstractMesh, name: str) -> int:
    """Size of mesh axis `name`; 1 when the mesh does not have it."""
    return dict(mesh.shape).get(name, 1)


def mesh_axes_for(mesh, logical_name: str) -> tuple[str, ...]:
    """The mesh axes a logical name maps to, among those the mesh has with size > 1."""
    if logical_name not in LOGICAL_AXIS_RULES:
        raise ValueError(f"unknown logical axis name {logical_name!r}; add it to LOGICAL_AXIS_RULES "
                         f"(known: {sorted(LOGICAL_AXIS_RULES)})")
    return tuple(a for a in LOGICAL_AXIS_RULES[logical_name] if axis_size(mesh, a) > 1)


def logical_to_spec(logical_names: Iterable[str | None], shape: Sequence[int] | None, mesh,
                    what: str = "array") -> PartitionSpec:
    """PartitionSpec for a value whose dims carry `logical_names` (None: replicated). With `shape`, a dim whose size
    does not divide its mesh axes' product is replicated, except "batch" and "experts", which raise ValueError.
    A mesh axis already used by an earlier dim is not reused."""
    logical_names = tuple(logical_names)
    if shape is not None and len(shape) != len(logical_names):
        raise ValueError(f"{what}: {len(logical_names)} logical names {logical_names} for shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_names):
        axes = () if name is None else tuple(a for a in mesh_axes_for(mesh, name) if a not in used)
        ways = math.prod(axis_size(mesh, a) for a in axes)
        if shape is not None and shape[dim] % ways:
            if name in MUST_DIVIDE:
                sizes = {a: axis_size(mesh, a) for a in axes}
                raise ValueError(f"{what}: its '{name}' dimension has size {shape[dim]}, not divisible by the mesh "
                                 f"axes {sizes} (product {ways}); choose a mesh whose {'x'.join(axes)} product "
                                 f"divides {shape[dim]}")
            axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _path_string(path) -> str:
    return "/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)


def param_shardings(abstract_params: Any, mesh: Mesh, logical_axes: Any) -> Any:
    """Pytree of NamedSharding for a parameter tree (arrays or jax.ShapeDtypeStruct): each parameter's logical names
    mapped through LOGICAL_AXIS_RULES.

    logical_axes: a tree like the parameters of name tuples (None in a tuple: that dim unnamed): for
    M1ForCausalLM's tree `m1jax.model.param_logical_axes(config or params)`, for a module's
    `m1jax.layers.partitioning.logical_axes(module, *inputs)`; None: every dim unnamed. Raises ValueError when the
    number of experts does not divide the mesh's "expert" axis, and when a parameter over UNNAMED_MAX_BYTES has an
    unnamed dim (it would be silently replicated on every device).
    """
    if logical_axes is None:
        logical_axes = jax.tree.map(lambda leaf: (None,) * len(leaf.shape), abstract_params)

    def sharding(path, leaf, names):
        where = _path_string(path)
        names = tuple(names)
        if len(names) != len(leaf.shape):
            raise ValueError(f"parameter {where} has shape {tuple(leaf.shape)} but {len(names)} logical names "
                             f"{names}")
        nbytes = math.prod(leaf.shape) * jax.numpy.dtype(leaf.dtype).itemsize
        if None in names and nbytes > UNNAMED_MAX_BYTES:
            raise ValueError(f"parameter {where} {tuple(leaf.shape)} ({nbytes / 2 ** 20:.1f} MiB) has no logical "
                             f"axis name for some dims {names}, so no sharding rule covers it and it would be "
                             "replicated on every device; create it with named logical axes "
                             "(m1jax.layers.partitioning.named(init, 'embed', ...)) and, for a new name, add it "
                             "to LOGICAL_AXIS_RULES in m1jax/sharding.py; for a tree other than M1ForCausalLM's, "
                             "pass logical_axes= (m1jax.layers.partitioning.logical_axes(module, *inputs))")
        return NamedSharding(mesh, logical_to_spec(names, leaf.shape, mesh, f"parameter {where}"))
    return jax.tree_util.tree_map_with_path(sharding, abstract_params, logical_axes)


def shard_params(params: Any, mesh: Mesh, logical_axes: Any) -> Any:
    """Place every parameter on `mesh` by its logical names (see param_shardings)."""
    return jax.device_put(params, param_shardings(params, mesh, logical_axes))


def batch_sharding(mesh: Mesh, batch_size: int | None = None, ndim: int = 2) -> NamedSharding:
    """Sharding of (B, T, ...) inputs (ndim dims): B split over ("data", "fsdp", "expert") jointly. With batch_size,
    a batch that does not divide the batch axes' product raises ValueError."""
    shape = None if batch_size is None else (batch_size,) + (1,) * (ndim - 1)
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), shape, mesh, "batch"))


def activation_sharding(mesh: Mesh, logical_names: Sequence[str | None],
                        shape: Sequence[int] | None = None) -> NamedSharding:
    """NamedSharding of an activation whose dims carry logical_names, e.g. ("batch", "length", "act_embed")."""
    return NamedSharding(mesh, logical_to_spec(logical_names, shape, mesh, "activation"))


def ambient_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh set by `jax.set_mesh`, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def constrain(x: jax.Array, *logical_names: str | None) -> jax.Array:
    """with_sharding_constraint by logical names under the ambient mesh (jax.set_mesh); a no-op without one."""
    mesh = ambient_mesh()
    if mesh is None or mesh.size == 1:
        return x
    if len(logical_names) != x.ndim:
        raise ValueError(f"constrain: {len(logical_names)} logical names {logical_names} for a value of shape "
                         f"{x.shape}; give one name (or None) per dim")
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_names, x.shape, mesh, "activation"))


def check_mesh(mesh, num_experts: int | None = None, batch_size: int | None = None) -> None:
    """Raise ValueError, naming the axis and the sizes, when the experts or the batch do not divide the mesh."""
    if num_experts is not None:
        logical_to_spec(("experts",), (num_experts,), mesh, "experts")
    if batch_size is not None:
        logical_to_spec(("batch",), (batch_size,), mesh, "batch")
