"""From a built model to a trainable one: process group, activation checkpointing, compile, FSDP2, weights.

The order is fixed (torchtitan's): build on the meta device -> swap the LM head for a LossHead ->
activation checkpointing per block -> torch.compile per block -> fully_shard per block, then the
embedding and the LM head as units of their own, root last -> materialise each rank's shards ->
random init or HF weights read shard by shard. The model file knows none of this.

The mesh ([parallel]: build_mesh). fully_shard gets a 1-D mesh (FSDP over every rank: the default) or
a 2-D (dp_replicate, shard) mesh, which FSDP2 runs as HSDP: parameters sharded within a group (a node),
replicated across groups, gradients reduce-scattered within and all-reduced across. Context-parallel
ranks hold the same weights, so they are part of the shard dimension (dp_shard x cp ranks), and a CP
process group of cp consecutive ranks carries their K/V exchange (skyt1.context_parallel).

The fused loss and the LM head. The loss reads lm_head.weight outside the model's forward, and under
FSDP2 that attribute is the full weight only while the unit holding it is unsharded. So the LM head
becomes a LossHead (an nn.Linear whose forward(hidden, labels) returns the summed fused cross-entropy)
and is its own FSDP unit: calling model.lm_head(hidden, labels) runs FSDP2's pre-forward hook, which
all-gathers the weight, so the fused loss reads the gathered weight; its post-backward hook
reduce-scatters the gradient the fused loss hands back. reshard_after_forward=False keeps the weight
gathered from the loss to its backward (the fused loss computes its gradients in the forward, so nothing
is re-gathered). The final norm (hidden_size values) stays in the root unit: a unit grouping [norm,
lm_head] would run a group whose second module is not called inside the model's forward, which FSDP2
only handles in recent releases. A tied model (Qwen2.5-0.5B) keeps the embedding, final norm and LM
head in the root unit, whose parameters FSDP2 keeps gathered from its forward through its backward.

Loading HF weights: each rank reads only its own rows of every tensor from the safetensors memory map
(safe_open(...).get_slice(name)[start:end]) and copies them into its local shard, so no rank ever holds
a whole tensor, let alone the whole model, on the GPU or in host memory.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from skyt1.checkpoint import IGNORED_SUFFIXES, CheckpointError, _open_safetensors, checkpoint_files, ours_to_hf
from skyt1.config import ConfigError, ModelConfig
from skyt1.kernels.fused_linear_ce import fused_linear_cross_entropy
from skyt1.model import RMSNorm, Transformer, build_model

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# Prefixes that wrappers put into parameter names; our own names (and HF's) never contain them.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


# ------------------------------------------------------------------------------------------------
# process group
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...), or make a
    one-process group when run as plain `python -m skyt1.train`, so every run goes through the same FSDP2
    code. NCCL on CUDA, gloo on CPU (SKYT1_DEVICE=cpu: the CPU and gloo even where CUDA is available, e.g. for
    several test ranks on a one-GPU machine). SKYT1_INIT_METHOD (e.g. file:///shared/rendezvous) replaces the TCP
    rendezvous at MASTER_ADDR:MASTER_PORT with another torch init_method: a file on a shared file system
    needs no open port."""
    if "RANK" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    else:
        rank, world, local_rank, local_world = 0, 1, 0, 1
    if torch.cuda.is_available() and os.environ.get("SKYT1_DEVICE", "cuda") != "cpu":
        if local_world > torch.cuda.device_count():
            # NCCL refuses two ranks on one GPU ("Duplicate GPU detected") only at the first collective,
            # with a message that names neither the cause nor the fix.
            raise ConfigError(
                f"{local_world} ranks on this machine but {torch.cuda.device_count()} CUDA device(s): rank "
                f"{rank} would share cuda:{local_rank % torch.cuda.device_count()} with another rank, which "
                f"NCCL refuses; start at most {torch.cuda.device_count()} ranks per machine (torchrun "
                "--nproc_per_node), or set SKYT1_DEVICE=cpu to run every rank on the CPU with gloo")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        # Processes on one host share its cores; oversubscribed threads slow every rank down.
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if "RANK" in os.environ:
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            if os.environ.get("SKYT1_INIT_METHOD"):
                kwargs.update(init_method=os.environ["SKYT1_INIT_METHOD"], rank=rank, world_size=world)
            dist.init_process_group(backend, timeout=timeout, **kwargs)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistEnv(rank, world, local_rank, device)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# the device mesh: HSDP (replicate x shard) and context parallelism
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MeshShape:
    """world = dp_replicate x dp_shard x cp. Rank layout (cp fastest, then shard, then replica):
    rank = (replica x dp_shard + shard) x cp + cp_rank, so a CP group is cp consecutive ranks and a shard
    group (dp_shard x cp ranks, the parameters' FSDP group) is a block of consecutive ranks: one node
    with torchrun's rank order."""

    dp_replicate: int
    dp_shard: int
    cp: int

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp

    @property
    def dp_size(self) -> int:
        """Data-parallel groups: each packs its own micro-batches (a CP group shares one)."""
        return self.dp_replicate * self.dp_shard

    @property
    def shard_size(self) -> int:
        """Ranks over which each parameter is sharded (its CP ranks hold the same weights: shard over them too)."""
        return self.dp_shard * self.cp

    def dp_rank(self, rank: int) -> int:
        return rank // self.cp

    def cp_rank(self, rank: int) -> int:
        return rank % self.cp

    def describe(self) -> str:
        """'FSDP 8', 'HSDP 2 replicas x 8', 'FSDP 4 x CP 2, weights sharded over 8', ..."""
        dp = (f"HSDP {self.dp_replicate} replicas x {self.dp_shard}" if self.dp_replicate > 1
              else f"FSDP {self.dp_shard}")
        return dp + (f" x CP {self.cp}, weights sharded over {self.shard_size}" if self.cp > 1 else "")


def resolve_mesh(parallel, world_size: int, *, token_budget: int | None = None,
                 local_world_size: int | None = None) -> MeshShape:
    """The mesh of a [parallel] section on world_size ranks; a ConfigError naming the field when it does not
    multiply to the world size, a node (replica) count does not divide it, or the CP degree cannot split
    the micro-batch token budget. Needs no process group: preflight runs it before any work."""
    R, S, C = parallel.dp_replicate, parallel.dp_shard, parallel.cp
    if world_size % R:
        raise ConfigError(f"parallel.dp_replicate = {R}: the {world_size} ranks do not divide into {R} replica "
                          f"groups (one per node: {world_size} ranks on {R} nodes is not a whole number per node)")
    if (world_size // R) % C:
        raise ConfigError(f"parallel.cp = {C}: a replica group of {world_size // R} ranks does not divide into "
                          f"context-parallel groups of {C}")
    if S == 0:
        S = world_size // (R * C)
    if R * S * C != world_size:
        raise ConfigError(f"parallel: dp_replicate x dp_shard x cp = {R} x {S} x {C} = {R * S * C}, but the run "
                          f"has {world_size} ranks; set parallel.dp_shard = {world_size // (R * C)} (or 0: the rest)")
    if token_budget is not None and C > 1 and token_budget % (2 * C):
        raise ConfigError(f"parallel.cp = {C}: data.token_budget = {token_budget} does not split into the 2 x {C} "
                          f"equal chunks the load-balanced (zigzag) split needs; use a multiple of {2 * C}, e.g. "
                          f"{token_budget // (2 * C) * 2 * C or 2 * C}")
    if local_world_size and R > 1 and (S * C) % local_world_size and local_world_size % (S * C):
        raise ConfigError(f"parallel: shard groups of dp_shard x cp = {S * C} ranks straddle nodes of "
                          f"{local_world_size} ranks; make dp_shard x cp a multiple or a divisor of the ranks "
                          "per node")
    return MeshShape(R, S, C)


@dataclass(frozen=True)
class ParallelMesh:
    shape: MeshShape
    fsdp: object            # DeviceMesh for fully_shard: (shard,) or (replicate, shard) = HSDP
    cp_group: object        # ProcessGroup of this rank's CP ranks, None without CP
    rank: int

    @property
    def dp_rank(self) -> int:
        return self.shape.dp_rank(self.rank)

    @property
    def cp_rank(self) -> int:
        return self.shape.cp_rank(self.rank)


def build_mesh(env: DistEnv, shape: MeshShape) -> ParallelMesh:
    """The DeviceMesh FSDP2 shards over and the CP process groups (collective: every rank calls it)."""
    from torch.distributed.device_mesh import init_device_mesh

    if shape.world_size != env.world_size:
        raise ConfigError(f"parallel: the mesh has {shape.world_size} ranks, the run {env.world_size}")
    if shape.dp_replicate > 1:
        fsdp = init_device_mesh(env.device.type, (shape.dp_replicate, shape.shard_size),
                                mesh_dim_names=("dp_replicate", "dp_shard"))
    else:
        fsdp = init_device_mesh(env.device.type, (shape.shard_size,), mesh_dim_names=("dp_shard",))
    cp_group = None
    if shape.cp > 1:
        groups = [list(range(g * shape.cp, (g + 1) * shape.cp)) for g in range(env.world_size // shape.cp)]
        cp_group, _ = dist.new_subgroups_by_enumeration(groups)
    return ParallelMesh(shape, fsdp, cp_group, env.rank)


# ------------------------------------------------------------------------------------------------
# the LM head that computes the loss
# ------------------------------------------------------------------------------------------------
class LossHead(nn.Linear):
    """The LM head. head(hidden) gives logits; head(hidden, labels) gives the fused linear
    cross-entropy summed over labelled tokens (fp32 scalar), never materialising (T, V) logits."""

    z_loss: float = 0.0

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return super().forward(hidden)  # (T, V)
        # On CPU the Triton row kernel would run under the interpreter (when a test set TRITON_INTERPRET):
        # the same chunked algorithm with its PyTorch row reference is the fast path there.
        impl = "auto" if hidden.is_cuda else "torch"
        # check_labels=False: no host sync per micro-batch; token ids were checked against the vocab at start.
        return fused_linear_cross_entropy(hidden, self.weight, labels, z_loss=self.z_loss, check_labels=False,
                                          impl=impl)


def install_loss_head(model: Transformer, z_loss: float = 0.0) -> LossHead:
    """Replace model.lm_head by a LossHead holding the same weight Parameter (ties survive)."""
    old = model.lm_head
    head = LossHead(old.in_features, old.out_features, bias=False, device="meta")
    head.weight = old.weight
    head.z_loss = float(z_loss)
    model.lm_head = head  # same key in _modules: module order (and init order) unchanged
    return head


# ------------------------------------------------------------------------------------------------
# activation checkpointing and compile
# ------------------------------------------------------------------------------------------------
def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    """"full": recompute every block in backward (keeps one (T, H) input per block);
    "selective": recompute only each block's MLP (keeps attention's activations: no attention recompute,
    but about 3x the memory of "full" at long context); "none"."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode == "none":
        return
    for i, block in enumerate(model.layers):
        if mode == "full":
            # No dropout anywhere: RNG state need not be replayed for the recompute.
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)
        elif mode == "selective":
            block.mlp = checkpoint_wrapper(block.mlp, preserve_rng_state=False)
        else:
            raise ConfigError(f"train.activation_checkpointing = {mode!r}: expected full, selective or none")


def apply_compile(model: Transformer) -> None:
    """torch.compile each block (after checkpointing, before sharding, as torchtitan does)."""
    for i, block in enumerate(model.layers):
        model.layers[i] = torch.compile(block)


def clean_name(name: str) -> str:
    """Our parameter name with wrapper prefixes removed: 'layers.0._checkpoint_wrapped_module.mlp...' ->
    'layers.0.mlp...'."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


# ------------------------------------------------------------------------------------------------
# FSDP2
# ------------------------------------------------------------------------------------------------
def shard_model(model: Transformer, env: DistEnv, compute_dtype: torch.dtype, cpu_offload: bool = False,
                mesh=None) -> None:
    """fully_shard per block, the embedding and the LM head (untied), then the root. mesh: the FSDP mesh
    (ParallelMesh.fsdp: 1-D = FSDP, 2-D (replicate, shard) = HSDP); None: flat over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if mesh is None:
        mesh = init_device_mesh(env.device.type, (env.world_size,))
    # Gradients are reduced in fp32 whatever the compute dtype; FSDP2 averages them over all the mesh's
    # ranks (HSDP: reduce-scatter within a shard group, all-reduce across groups), and the train step
    # scales each rank's loss by world_size to turn that average into the sum it needs.
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    kw = dict(mesh=mesh, mp_policy=mp, offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        # The last block's backward runs right after the loss: resharding it would only re-gather it.
        fully_shard(block, reshard_after_forward=i < n - 1, **kw)
    if not model.cfg.tie_word_embeddings:
        fully_shard(model.embed_tokens, reshard_after_forward=True, **kw)
        fully_shard(model.lm_head, reshard_after_forward=False, **kw)
    fully_shard(model, **kw)


def _local_rows(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's local tensor, index of its first row in the full tensor): FSDP2 shards dim 0."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return p.data, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    local = p.to_local()
    if any(o != 0 for o in offset[1:]):
        raise RuntimeError(f"expected dim-0 sharding, got placements {p.placements}")
    return local, int(offset[0]) if len(offset) else 0


def named_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(our clean name, parameter), a tied matrix once (as the embedding)."""
    for name, p in model.named_parameters():
        yield clean_name(name), p


@torch.no_grad()
def init_random_(model: Transformer, seed: int, std: float = 0.02) -> None:
    """Model.init_weights' scheme and draw order, on sharded parameters: each full tensor is drawn from
    one generator on every rank and each rank keeps its rows, so the result equals
    build_model(cfg, seed=seed) on CPU whatever the world size (on CUDA the draws come from a CUDA
    generator: same on every rank, not equal to the CPU draws)."""
    dev = next(model.parameters()).to_local().device if hasattr(next(model.parameters()), "to_local") \
        else next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    tied = model.cfg.tie_word_embeddings
    for module in model.modules():
        if module is model.lm_head and tied:
            continue
        if isinstance(module, (nn.Linear, nn.Embedding)):
            local, start = _local_rows(module.weight)
            full = torch.randn(module.weight.shape, generator=gen, dtype=torch.float32, device=dev) * std
            local.copy_(full[start:start + local.shape[0]])
            if getattr(module, "bias", None) is not None:
                _local_rows(module.bias)[0].zero_()
        elif isinstance(module, RMSNorm):
            _local_rows(module.weight)[0].fill_(1.0)


def fsdp_slice(hf_name: str, p: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], int, int]:
    """(local tensor, full shape, sharded dim, first index along it): FSDP2's dim-0 shards."""
    local, start = _local_rows(p)
    return local, tuple(p.shape), 0, start


@torch.no_grad()
def load_sharded_weights(model: Transformer, path: str | Path, *, allow_extra_layers: bool = False,
                         slicer=fsdp_slice) -> None:
    """Copy each rank's rows of every tensor of a HF checkpoint into its local shards (memory-mapped
    reads of exactly those rows). allow_extra_layers: the checkpoint may hold more blocks than the
    model (a model.layers override keeps the first N). slicer(hf_name, param) says which part of the full
    tensor a parameter holds (FSDP2's rows by default; the sampler's tensor parallelism passes its own:
    rows or columns, a local shard longer than what is left of the full tensor being zero-padded)."""
    cfg = model.cfg
    params = {ours_to_hf(name): p for name, p in named_params(model)}
    files = checkpoint_files(path)
    tied = cfg.tie_word_embeddings
    by_file: dict[Path, list[str]] = {}
    for hf_name, f in files.items():
        if hf_name.endswith(IGNORED_SUFFIXES) or (tied and hf_name == "lm_head.weight"):
            continue
        if hf_name not in params:
            if allow_extra_layers and _layer_index(hf_name) is not None and _layer_index(hf_name) >= cfg.num_hidden_layers:
                continue
            raise CheckpointError(f"{f}: unexpected tensor {hf_name!r} (not part of a "
                                  f"{cfg.num_hidden_layers}-layer Qwen2 model)")
        by_file.setdefault(f, []).append(hf_name)
    missing = sorted(set(params) - {n for names in by_file.values() for n in names})
    if missing:
        raise CheckpointError(f"{path}: missing {len(missing)} tensor(s): {', '.join(missing[:5])}"
                              + (" ..." if len(missing) > 5 else ""))
    for f, names in by_file.items():
        with _open_safetensors(f) as fh:
            for hf_name in names:
                local, full_shape, dim, start = slicer(hf_name, params[hf_name])
                sl = fh.get_slice(hf_name)
                shape = tuple(sl.get_shape())
                if shape != full_shape:
                    raise CheckpointError(f"{f}: tensor {hf_name!r} has shape {shape}, the model expects "
                                          f"{full_shape}")
                if local.numel() == 0:
                    continue
                n = max(0, min(local.shape[dim], shape[dim] - start))
                part = sl[(slice(None),) * dim + (slice(start, start + n),)]  # only this part is read from the file
                local.narrow(dim, 0, n).copy_(part.to(dtype=local.dtype))
                if n < local.shape[dim]:
                    local.narrow(dim, n, local.shape[dim] - n).zero_()


def _layer_index(hf_name: str) -> int | None:
    parts = hf_name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return None


def build_sharded_meta_model(cfg: ModelConfig, env: DistEnv, *, param_dtype: torch.dtype,
                             compute_dtype: torch.dtype, activation_checkpointing: str = "full",
                             compile: bool = False, cpu_offload: bool = False, z_loss: float = 0.0,
                             mesh=None) -> Transformer:
    """build_parallel_model's steps up to sharding, in their fixed order, on the meta device: nothing is
    allocated until to_empty (the dry run calls that inside FakeTensorMode)."""
    model = build_model(cfg, device="meta", dtype=param_dtype)
    install_loss_head(model, z_loss)
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        apply_compile(model)
    shard_model(model, env, compute_dtype, cpu_offload, mesh)
    return model


def build_parallel_model(cfg: ModelConfig, env: DistEnv, *, param_dtype: torch.dtype, compute_dtype: torch.dtype,
                         activation_checkpointing: str = "full", compile: bool = False, cpu_offload: bool = False,
                         z_loss: float = 0.0, init: str = "random", weights: str | Path | None = None,
                         init_seed: int = 0, allow_extra_layers: bool = False, mesh=None) -> Transformer:
    """The training model: sharded over env's ranks (or over `mesh`, a ParallelMesh's fsdp mesh), parameters
    in param_dtype (the optimizer's layout), forward/backward in compute_dtype. init: "load" (HF weights from `weights`), "random" (init_seed) or
    "none" (uninitialised memory, for a checkpoint to overwrite)."""
    if init not in ("load", "random", "none") or (init == "load" and weights is None):
        raise ValueError(f"init={init!r} (weights={weights!r}): expected 'load' with weights, 'random' or 'none'")
    model = build_sharded_meta_model(cfg, env, param_dtype=param_dtype, compute_dtype=compute_dtype,
                                     activation_checkpointing=activation_checkpointing, compile=compile,
                                     cpu_offload=cpu_offload, z_loss=z_loss, mesh=mesh)
    model.to_empty(device="cpu" if cpu_offload else env.device)
    if cfg.tie_word_embeddings and model.lm_head.weight is not model.embed_tokens.weight:
        raise RuntimeError("the tied LM head lost its tie while materialising the sharded model")
    if init == "load":
        load_sharded_weights(model, weights, allow_extra_layers=allow_extra_layers)
    elif init == "random":
        init_random_(model, init_seed)
    return model


# ------------------------------------------------------------------------------------------------
# gathering full tensors (export)
# ------------------------------------------------------------------------------------------------
def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """The whole parameter (a collective: every rank must call it, in the same order)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return p.detach()
    local = p.to_local()
    mesh_device = torch.device(p.device_mesh.device_type)
    if local.device.type != mesh_device.type:  # CPU-offloaded shard on a CUDA mesh
        local = local.to(mesh_device)
        p = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    return p.detach().full_tensor()


def iter_full_hf_tensors(model: Transformer, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor on CPU) one parameter at a time; a collective generator: all ranks must
    run it to the end (only rank 0 needs to keep what it yields)."""
    for name, p in named_params(model):
        t = full_tensor(p)
        if dtype is not None:
            t = t.to(dtype)
        yield ours_to_hf(name), t.cpu()
