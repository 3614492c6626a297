"""Validated stage configs loaded from YAML.

Every stage has one pydantic model; unknown keys, wrong types and out-of-range values are
rejected, and :func:`load_config` turns the first error into one line that names the file and
the key (``ConfigError``). Example configs ship in ``pipeline/configs/`` and double as the config
reference: each key is commented there.
"""

from __future__ import annotations

import inspect
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from kernels.dynamics import MODEL_NAMES, default_size, model_class


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the file and key."""


class Strict(BaseModel):
    """Base for every config section: no unknown keys, no silent type coercion, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
DType = Literal["float32", "float64"]
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


def _check_device(v: str) -> str:
    if not _DEVICE.match(v):
        raise ValueError("must be cpu, cuda, cuda:N or mps")  # the message adds what it got
    return v


Device = Annotated[str, AfterValidator(_check_device)]


class ModelConfig(Strict):
    """Which dynamical model, at what size, with which parameter values."""

    name: Literal[MODEL_NAMES]  # type: ignore[valid-type]
    size: PosInt | None = None
    params: dict[str, float] = Field(default_factory=dict)
    dt: Annotated[float, Field(gt=0)] | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_against_model(self) -> ModelConfig:
        cls = model_class(self.name)
        known = {p.name: p for p in cls.params}
        for key, value in self.params.items():
            if key not in known:
                raise _field_error(("params", key), f"{self.name} has no parameter {key!r} "
                                   f"(known: {', '.join(known)})")
            p = known[key]
            if p.transform == "log" and value <= 0:  # its lower bound is the smallest float
                raise _field_error(("params", key), f"{value} is not positive")
            if not (p.lower < value < p.upper):
                raise _field_error(("params", key), f"{value} is outside ({p.lower}, {p.upper})")
        sig = inspect.signature(cls.__init__)
        allowed = {n for n, q in sig.parameters.items() if q.kind is q.KEYWORD_ONLY}
        for key in self.options:
            if key not in allowed:
                raise _field_error(("options", key), f"{self.name} has no option {key!r} "
                                   f"(known: {', '.join(sorted(allowed)) or 'none'})")
        try:
            model = self.build()
        except (TypeError, ValueError) as exc:
            raise _field_error((self._culprit(),), str(exc)) from None
        # resolve defaults so that the config stored beside an output is complete
        if self.size is None:
            object.__setattr__(self, "size", default_size(self.name))
        if self.dt is None:
            object.__setattr__(self, "dt", float(model.default_dt))
        return self

    def _culprit(self) -> str:
        """Which key a failed build is blamed on: ``options`` when the model builds without them."""
        if self.size is None or not self.options:
            return "options" if self.size is None else "size"
        from kernels.dynamics import get_model

        try:
            get_model(self.name, self.size)
        except (TypeError, ValueError):
            return "size"
        return "options"

    def build(self):  # -> Dynamics (kept untyped to avoid importing torch types here)
        """Construct the model object."""
        from kernels.dynamics import get_model

        return get_model(self.name, self.size, **self.options)


class SimulateConfig(Strict):
    """``scoreda simulate``: integrate an ensemble of one model and store the trajectories."""

    stage: Literal["simulate"] = "simulate"
    model: ModelConfig
    members: PosInt = 1
    steps: PosInt = 100
    save_every: PosInt = 1
    spinup: NonNegInt = 0
    seed: NonNegInt = 0
    theta: Literal["truth", "prior"] = "truth"
    dtype: DType = "float32"
    device: Device = "cpu"
    # a member whose integration fails (non-finite, or past the model's growth bound) over one
    # saved interval redoes it with half the step and keeps it, up to this many times
    max_refinements: Annotated[int, Field(ge=0, le=10)] = 3

    @model_validator(mode="after")
    def _steps_multiple(self) -> SimulateConfig:
        if self.steps % self.save_every:
            raise _field_error(("steps",), f"{self.steps} is not a multiple of save_every "
                               f"({self.save_every})")
        return self


STAGES: dict[str, type[Strict]] = {"simulate": SimulateConfig}


class _FieldError(ValueError):
    def __init__(self, loc: tuple[str, ...], msg: str) -> None:
        super().__init__(msg)
        self.loc = loc


def _field_error(loc: tuple[str, ...], msg: str) -> _FieldError:
    return _FieldError(loc, msg)


def _absolute_path(v: str | None) -> str | None:
    """A path option made absolute against the working directory when the config is read
    (stages may run elsewhere, e.g. under SLURM); empty strings are refused."""
    if v is None:
        return None
    if not v.strip():
        raise ValueError("must not be empty")
    return str(Path(v).expanduser().absolute())


def _format(err: ValidationError, source: str, prefix: tuple[str | int, ...] = ()) -> str:
    e = err.errors(include_url=False)[0]
    loc = tuple(e.get("loc", ()))
    msg = e.get("msg", "invalid")
    ctx_err = (e.get("ctx") or {}).get("error")
    if isinstance(ctx_err, _FieldError):
        loc, msg = loc + ctx_err.loc, str(ctx_err)
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    key = ".".join(str(p) for p in prefix + loc) or "<top>"
    if e.get("type") == "extra_forbidden":
        msg = "unknown key"
    elif e.get("type") == "missing":
        msg = "required key is missing"
    elif "input" in e and e["type"] not in ("model_type", "dict_type") and not isinstance(
        e["input"], dict
    ):
        msg = f"{msg} (got {e['input']!r})"
    return f"{source}: {key}: {msg}"


def validate(data: Any, schema: type[Strict], source: str = "<config>") -> Strict:
    """Validate a mapping against ``schema``; raise ``ConfigError`` with a one-line message."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None


def with_later_defaults(stored: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``stored`` (a config dump written by an earlier version) with the keys it lacks taken from
    ``defaults`` (a dump of the same schema now), recursively. A key added to a schema defaults
    to the behaviour from before it existed, so the filled dump says what the old one meant."""
    out = dict(stored)
    for k, v in defaults.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = with_later_defaults(out[k], v)
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML config (not UTF-8 text)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        raise ConfigError(f"{path}: empty config")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return data


def load_config(path: str | Path, stage: str | None = None) -> Strict:
    """Load and validate a stage config; ``stage`` (if given) must match its ``stage`` key."""
    data = load_yaml(path)
    name = data.get("stage", stage)
    if name not in STAGES:
        raise ConfigError(f"{path}: stage: must be one of {', '.join(STAGES)} (got {name!r})")
    if stage is not None and name != stage:
        raise ConfigError(f"{path}: stage: this command needs a {stage!r} config (got {name!r})")
    return validate(data, STAGES[name], str(path))


def dump(cfg: Strict) -> str:
    """The resolved config as YAML (defaults filled in), to store beside every output."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------------------------
# shipped example configs
def example_names() -> list[str]:
    """Names of the example configs shipped inside the package."""
    files = resources.files("pipeline") / "configs"
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def example_path(name: str) -> Path:
    """Path of a shipped example config by name (with or without ``.yaml``)."""
    name = name[:-5] if name.endswith(".yaml") else name
    path = Path(str(resources.files("pipeline") / "configs" / f"{name}.yaml"))
    if not path.is_file():
        raise ConfigError(f"no example config {name!r}; known: {', '.join(example_names())}")
    return path


def resolve_config_path(name_or_path: str) -> Path:
    """A config argument is a file path, or else the name of a shipped example."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if p.suffix in (".yaml", ".yml") and (p.parent != Path(".") or p.exists()):
        raise ConfigError(f"{p}: no such config file")
    return example_path(name_or_path)


# --------------------------------------------------------------------------------------------
# generate: trajectory stores (pipeline/generate.py, pipeline/store.py)
def _check_uniform(p: Any, spec: PriorSpec, loc: tuple[str, ...]) -> None:
    """A uniform prior must stay inside the parameter's domain (a draw outside it is not a
    model the dynamics can run: a negative viscosity, say)."""
    if spec.uniform is None:
        return
    lo, hi = spec.uniform
    if not (p.lower <= lo and hi <= p.upper and (p.transform != "log" or lo > 0)):
        raise _field_error(loc, f"{spec.uniform} leaves ({p.lower}, {p.upper})"
                           + (" or is not positive" if p.transform == "log" else ""))


class PriorSpec(Strict):
    """Prior of one estimated parameter: ``uniform: [lo, hi]`` in the natural space, or
    ``normal: [loc, scale]`` in the unconstrained space."""

    uniform: Annotated[list[float], Field(min_length=2, max_length=2)] | None = None
    normal: Annotated[list[float], Field(min_length=2, max_length=2)] | None = None

    @model_validator(mode="after")
    def _one(self) -> PriorSpec:
        if (self.uniform is None) == (self.normal is None):
            raise _field_error(("uniform",), "give exactly one of uniform or normal")
        if self.uniform is not None and not self.uniform[0] < self.uniform[1]:
            raise _field_error(("uniform",), f"lower bound {self.uniform[0]} is not below {self.uniform[1]}")
        if self.normal is not None and not self.normal[1] > 0:
            raise _field_error(("normal",), f"scale {self.normal[1]} must be positive")
        return self


class ThetaConfig(Strict):
    """How each trajectory's θ is chosen.

    ``prior``: drawn once per trajectory from the model's prior (stream ``(seed, "theta", j)``).
    ``fixed``: the truth values with ``model.params`` overrides, the same for every trajectory.
    ``walk``: starts as ``start`` says, then follows a random walk in the unconstrained space,
    one increment per saved interval (stream ``(seed, "walk", j)``): the "roughening" dynamics
    of parameter particles, so that training windows see θ as part of an augmented state.
    """

    mode: Literal["prior", "fixed", "walk"] = "prior"
    start: Literal["prior", "fixed"] = "prior"
    walk_std: Annotated[float, Field(ge=0)] = 0.02
    walk_reversion: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # per parameter, a prior to draw from instead of the model's (``prior`` mode and a walk's
    # prior start): e.g. a training store wider than the prior the truths come from
    prior: dict[str, PriorSpec] = Field(default_factory=dict)

    @property
    def initial(self) -> Literal["prior", "fixed"]:
        """Where a trajectory's first θ comes from (a walk starts as ``start`` says)."""
        return self.start if self.mode == "walk" else self.mode


class StoreConfig(Strict):
    """Layout of the Zarr v3 store: stored grids, shards (unit of writing), chunks (of reading)."""

    grids: list[PosInt] | None = None
    trajectories_per_shard: PosInt = 4
    shard_frames: PosInt | None = None
    chunk_frames: PosInt = 8
    codec: Literal["zstd", "blosc-zstd"] = "blosc-zstd"
    level: Annotated[int, Field(ge=1, le=22)] = 3


class SplitConfig(Strict):
    """Fractions of trajectories in the validation and test splits (the rest is training)."""

    valid: Annotated[float, Field(ge=0, le=1)] = 0.1
    test: Annotated[float, Field(ge=0, le=1)] = 0.1

    @model_validator(mode="after")
    def _sum(self) -> SplitConfig:
        if self.valid + self.test > 1:
            raise _field_error(("test",), f"valid + test = {self.valid + self.test} exceeds 1")
        return self


class DaskConfig(Strict):
    """Where the work runs. Only ``threads_per_worker`` changes the stored numbers (torch's
    thread count moves the last bits), so it alone is part of the config hash."""

    workers: PosInt | None = None
    threads_per_worker: PosInt = 1
    scheduler: str | None = None
    dashboard: str | None = ":8787"  # null: no dashboard
    memory_limit: str = "auto"

    @field_validator("scheduler")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(tcp|tls|inproc|ucx|ws|wss)://\S+$", v):
            raise ValueError(f"must be a scheduler address like tcp://host:8786, got {v!r}")
        return v


class GenerateConfig(Strict):
    """``scoreda generate``: many trajectories into one sharded Zarr v3 store, with Dask."""

    stage: Literal["generate"] = "generate"
    model: ModelConfig
    out: str | None = None
    trajectories: PosInt = 8
    frames: PosInt = 16
    save_every: PosInt = 1
    spinup: NonNegInt = 0
    # a trajectory whose integration fails (non-finite, or past the model's growth bound) over
    # one saved interval redoes it with half the step, up to this many times (dt / 2**n)
    max_refinements: Annotated[int, Field(ge=0, le=10)] = 3
    seed: NonNegInt = 0
    theta: ThetaConfig = Field(default_factory=ThetaConfig)
    dtype: DType = "float32"
    device: Device = "cpu"
    store: StoreConfig = Field(default_factory=StoreConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    dask: DaskConfig = Field(default_factory=DaskConfig)

    @model_validator(mode="after")
    def _layout(self) -> GenerateConfig:
        st = self.store
        if self.trajectories % st.trajectories_per_shard:
            raise _field_error(("store", "trajectories_per_shard"),
                               f"{st.trajectories_per_shard} does not divide trajectories "
                               f"({self.trajectories})")
        shard_frames = st.shard_frames or self.frames
        if self.frames % shard_frames:
            raise _field_error(("store", "shard_frames"),
                               f"{shard_frames} does not divide frames ({self.frames})")
        if shard_frames % st.chunk_frames:
            raise _field_error(("store", "chunk_frames"),
                               f"{st.chunk_frames} does not divide the frames per shard "
                               f"({shard_frames})")
        size = int(self.model.size)  # resolved by ModelConfig
        for g in st.grids or []:
            if size % g:
                raise _field_error(("store", "grids"),
                                   f"stored grid {g} does not divide the simulated size {size}")
        if st.grids is not None and len(set(st.grids)) != len(st.grids):
            raise _field_error(("store", "grids"), f"repeated grid size in {st.grids}")
        if st.grids is not None and not st.grids:
            raise _field_error(("store", "grids"), "give at least one grid size")
        if self.theta.mode == "walk" and self.theta.walk_std == 0:
            raise _field_error(("theta", "walk_std"), "must be > 0 for mode 'walk'")
        if self.theta.prior:
            if self.theta.initial != "prior":
                raise _field_error(("theta", "prior"), "only θ drawn from a prior uses it "
                                   f"(mode {self.theta.mode!r}, start {self.theta.start!r})")
            known = {p.name: p for p in model_class(self.model.name).params}
            for name, spec in self.theta.prior.items():
                if name not in known:
                    raise _field_error(("theta", "prior", name), f"{self.model.name} has no "
                                       f"parameter {name!r} (known: {', '.join(known)})")
                _check_uniform(known[name], spec, ("theta", "prior", name, "uniform"))
        return self


STAGES["generate"] = GenerateConfig


# --------------------------------------------------------------------------------------------
# assimilate: single-process twin experiments (pipeline/assimilate.py)
class ObservationConfig(Strict):
    """The observation network: operator, nonlinearity, noise and frequency."""

    kind: Literal["identity", "every_kth", "random_mask", "coarse_pool",
                  "coarse_velocity"] = "identity"
    options: dict[str, Any] = Field(default_factory=dict)
    nonlinearity: Literal["arctan", "saturation"] | None = None
    sigma: Annotated[float, Field(gt=0)] = 1.0
    every: PosInt = 1


class ParametersConfig(Strict):
    """Which parameters are unknown (θ particles) and how they are treated."""

    estimate: list[str] = Field(default_factory=list)
    prior: dict[str, PriorSpec] = Field(default_factory=dict)
    roughening: Annotated[float, Field(ge=0)] = 0.0
    roughening_decay: Annotated[float, Field(gt=0, le=1)] = 1.0


class EnSFConfig(Strict):
    """EnSF tuning (kernels/ensf.py documents each knob and the measurements behind it)."""

    steps: PosInt = 100
    eps_alpha: Annotated[float, Field(gt=0, le=1)] = 0.05
    eps_beta: Annotated[float, Field(ge=0, le=1)] = 0.0
    estimator: Literal["paired", "mixture", "gm", "gaussian"] = "gaussian"
    likelihood: Literal["damped", "denoised"] = "denoised"
    mixture_size: PosInt | None = None
    gm_bandwidth: Annotated[float, Field(gt=0)] = 1.0
    gm_shrink: bool = False
    sampler: Literal["sde", "ode"] = "sde"
    score_clip: Annotated[float, Field(gt=0)] | None = 50.0
    init: Literal["noise", "prior"] = "prior"
    # unobserved state and θ from the observed increments: "regression" (all observed ones),
    # "local" (grid points from the observed ones within 2·filter.radius, θ from all; for
    # partially observed fields), "none" (prior score only)
    coupling: Literal["none", "regression", "local"] = "regression"
    # relative ridge of the θ regression: with fewer members than observed components a small
    # ridge fits the θ anomalies exactly and collapses their spread in a few cycles (measured)
    ridge: Annotated[float, Field(ge=0)] = 1.0


class SDAConfig(Strict):
    """Predictor–corrector sampler of ``kernels.score.sda`` (docs/smooth.md)."""

    steps: PosInt = 128                              # reverse-diffusion steps from t = 1 to 0
    corrector: NonNegInt = 1                         # Langevin corrector steps per step (≥ 1:
                                                     # without it composed sampling diverges)
    tau: Annotated[float, Field(gt=0)] = 0.25        # corrector step-size factor
    gamma: Annotated[float, Field(ge=0)] = 1.0       # likelihood variance σ_y² + γ s (σ_t/μ_t)²,
                                                     # s = state variance (physical units)
    ddim_eta: Annotated[float, Field(ge=0, le=1)] = 0.0  # 0 deterministic DDIM predictor, 1 ancestral
    theta_clip: Annotated[float, Field(gt=0)] | None = 4.0  # |denoised θ| ≤ this many training
                                                     # stds from the training mean (null: none)
    # static θ from the windows (docs/smooth.md): "auto" = the shared composition for a model
    # trained with shared θ noise (each window's evidence weighted 1/W over the prior), "pooled"
    # (mean of the windows' outputs) for a per-frame one; "evidence" (per-frame models only: a
    # finite-difference Gaussian reading of each window; P extra window passes)
    theta_composition: Literal["auto", "evidence", "pooled"] = "auto"
    # c in (0, 1]: the shared/evidence compositions weight each window's θ evidence c/W, not 1/W
    # (overlapping windows repeat the evidence of their states' marginals; docs/smooth.md)
    theta_evidence_scale: Annotated[float, Field(gt=0, le=1)] = 1.0
    # whether the likelihood's gradient also moves θ through the denoiser (false: θ follows the
    # sampled states only — y is independent of θ given them; docs/smooth.md)
    theta_guidance: bool = True
    # 0: the likelihood variance above (γ); k ≥ 1: plus Tweedie's covariance of x̂_0 through
    # the denoiser, H (σ_t²/μ_t) ∂x̂_0/∂x_t Hᵀ, solved by k conjugate-gradient steps (each one
    # more backward pass; docs/smooth.md "Likelihood covariance")
    likelihood_cg: NonNegInt = 0

    def settings(self):  # -> kernels.score.sda.SDASettings (untyped: no torch import here)
        """The kernel sampler's settings from these keys (θ's composition is the caller's)."""
        from kernels.score.sda import SDASettings

        return SDASettings(steps=self.steps, corrector=self.corrector, tau=self.tau,
                           gamma=self.gamma, ddim_eta=self.ddim_eta, theta_clip=self.theta_clip,
                           theta_guidance=self.theta_guidance, likelihood_cg=self.likelihood_cg)


class CampaignSDAConfig(SDAConfig):
    """SDA as a campaign filter (docs/campaign.md): at cycle c the posterior of the window of
    the last ``window`` cycles' frames (and θ) is sampled with the sampler settings above; the
    members become the samples of the last frame. ``model`` (a `scoreda train` run directory) is
    made absolute against the working directory when the config is read."""

    model: str                                       # run directory of `scoreda train`
    window: PosInt = 8                               # frames L per window (≥ the model's window)
    batch: PosInt = 8                                # members per sampler batch: fixed global
                                                     # blocks, so results do not depend on ranks
    dtype: DType = "float32"                         # sampler precision (the net's own: float32)
    static_theta: bool | None = None                 # one θ per window; null: from the training
                                                     # store (its θ mode is not `walk`)

    @field_validator("model")
    @classmethod
    def _absolute(cls, v: str) -> str:
        return _absolute_path(v)


class FilterConfig(Strict):
    """The analysis method and its tuning."""

    method: Literal["ensf", "letkf", "enkf", "sda"] = "letkf"
    inflation: Annotated[float, Field(ge=1)] = 1.0
    rtps: Annotated[float, Field(ge=0, le=1)] = 0.0
    radius: Annotated[float, Field(gt=0)] | None = None
    ensf: EnSFConfig = Field(default_factory=EnSFConfig)
    # columns per block of the distributed EnSF analysis (paired/gaussian) and of its regression
    # sums; results are identical for any rank count at a fixed value
    column_chunk: Annotated[int, Field(ge=1)] = 16384
    # method sda (campaigns only): the trained window model and the sliding-window sampler
    sda: CampaignSDAConfig | None = None

    @model_validator(mode="after")
    def _sda(self) -> FilterConfig:
        if self.method == "sda" and self.sda is None:
            raise _field_error(("sda",), "method sda needs filter.sda (at least model: a "
                                         "`scoreda train` run directory)")
        if self.method != "sda" and self.sda is not None:
            raise _field_error(("sda",), f"only used with method sda (method is {self.method})")
        if self.method == "ensf" and self.ensf.coupling == "local":
            if self.radius is None:
                raise _field_error(("radius",), "ensf.coupling local needs a localization radius")
            if not self.ensf.ridge > 0:
                raise _field_error(("ensf", "ridge"), "must be > 0 with coupling local")
        return self


class InitialEnsembleConfig(Strict):
    """Initial ensemble: the truth's initial state plus N(0, spread²) noise per member."""

    spread: Annotated[float, Field(ge=0)] = 1.0


class ShockConfig(Strict):
    """Unmodelled shocks to the truth: with ``probability`` per cycle, a random ``fraction`` of
    the state components jumps by ``amplitude`` × N(0, 1). The ensemble's model does not know
    about them, so the forecast prior is badly wrong exactly where the shock hit."""

    probability: Annotated[float, Field(ge=0, le=1)] = 0.0
    fraction: Annotated[float, Field(gt=0, le=1)] = 0.3
    amplitude: Annotated[float, Field(ge=0)] = 5.0


class AssimilateConfig(Strict):
    """``scoreda assimilate``: a twin experiment — truth run, synthetic observations, cycling."""

    stage: Literal["assimilate"] = "assimilate"
    model: ModelConfig
    members: Annotated[int, Field(ge=2)] = 20
    cycles: PosInt = 100
    burn_in: NonNegInt = 0
    truth_spinup: NonNegInt = 1000
    seed: NonNegInt = 0
    dtype: DType = "float64"
    device: Device = "cpu"
    observation: ObservationConfig = Field(default_factory=ObservationConfig)
    parameters: ParametersConfig = Field(default_factory=ParametersConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    initial: InitialEnsembleConfig = Field(default_factory=InitialEnsembleConfig)
    shocks: ShockConfig = Field(default_factory=ShockConfig)
    store_states: bool | None = None
    # a member whose forecast fails (non-finite, past the model's growth bound or, in a
    # campaign, past `blowup`) redoes that cycle's forecast with half the step, up to this many
    # times (dt / 2**n); each cycle starts again from dt
    max_refinements: Annotated[int, Field(ge=0, le=10)] = 3

    @model_validator(mode="after")
    def _check(self) -> AssimilateConfig:
        if self.burn_in >= self.cycles:
            raise _field_error(("burn_in",), f"{self.burn_in} leaves no cycles to score "
                                             f"(cycles = {self.cycles})")
        names = model_class(self.model.name).params
        known = {p.name: p for p in names}
        est = self.parameters.estimate
        for i, name in enumerate(est):
            if name not in known:
                raise _field_error(("parameters", "estimate", str(i)),
                                   f"{self.model.name} has no parameter {name!r} "
                                   f"(known: {', '.join(known)})")
        if len(set(est)) != len(est):
            raise _field_error(("parameters", "estimate"), f"repeated name in {est}")
        for name, spec in self.parameters.prior.items():
            if name not in est:
                raise _field_error(("parameters", "prior", name),
                                   f"{name!r} is not in parameters.estimate")
            _check_uniform(known[name], spec, ("parameters", "prior", name, "uniform"))
        try:
            from kernels.observe import make_operator

            model = self.model.build()
            obs = self.observation
            make_operator(obs.kind, model.state_shape, nonlinearity=obs.nonlinearity, **obs.options)
        except ValueError as exc:
            raise _field_error(("observation", "options"), str(exc)) from None
        if self.filter.method == "sda" and self.stage == "assimilate":
            raise _field_error(("filter", "method"), "sda runs as a sliding-window filter only "
                                                     "in `scoreda campaign` (stage: campaign)")
        if self.filter.method == "letkf" and self.members < 3:
            raise _field_error(("members",), "LETKF needs at least 3 members")
        return self


STAGES["assimilate"] = AssimilateConfig


# --------------------------------------------------------------------------------------------
# campaign: distributed, restartable twin experiments (pipeline/campaign.py)
class ObservationFileConfig(Strict):
    """Observations read from a file instead of a twin run (docs/campaign.md: file layout).

    ``path``: a netCDF (``.nc``) file or a Zarr store (``.zarr``) holding ``variable`` with
    dims ``(cycle, obs)``; ``sigma``: name of an ``(obs,)`` variable or a scalar attribute (of the
    dataset or of ``variable``) with the noise std; when absent ``observation.sigma`` is used.
    A relative path is made absolute (against the working directory) when the config is read.
    """

    path: str
    variable: str = "y"
    sigma: str = "sigma"

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        return _absolute_path(v)


class CampaignConfig(AssimilateConfig):
    """``scoreda campaign``: the twin experiment of ``assimilate`` run by MPI ranks (each owns a
    contiguous slice of members and their θ particles) into a restartable run directory.

    Every ``assimilate`` key means the same here; the extra keys say how the run is kept.
    """

    stage: Literal["campaign"] = "campaign"  # type: ignore[assignment]
    checkpoint_every: PosInt = 1
    keep_checkpoints: Annotated[int, Field(ge=1)] = 2
    threads: PosInt = 1
    blowup: Annotated[float, Field(gt=0)] = 1e8
    observations: ObservationFileConfig | None = None

    @model_validator(mode="after")
    def _campaign(self) -> CampaignConfig:
        if self.device != "cpu":
            raise _field_error(("device",), "campaigns run on cpu (one MPI rank per core)")
        return self


STAGES["campaign"] = CampaignConfig


# --------------------------------------------------------------------------------------------
# train: score networks over windows of the trajectory store (pipeline/train.py)
class NetworkConfig(Strict):
    """The ε-network: ``kind`` ring (1-D circular residual net) or unet (2-D, circular padding);
    ``options`` go to ``kernels.score.nets.build_network`` (e.g. width, depth, mults)."""

    kind: Literal["ring", "unet"] = "ring"
    options: dict[str, Any] = Field(default_factory=dict)


class OptimConfig(Strict):
    """AdamW with linear warm-up then cosine decay to ``lr · min_lr_ratio``."""

    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    warmup: Annotated[int, Field(ge=0)] = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.05
    grad_clip: Annotated[float, Field(gt=0)] | None = 1.0
    ema: Annotated[float, Field(ge=0, lt=1)] = 0.999


class TrainConfig(Strict):
    """``scoreda train``: a window denoiser on the store's train split, DDP over ranks."""

    stage: Literal["train"] = "train"
    store: str                                    # the trajectory store (.zarr)
    grid: PosInt | None = None                    # stored grid (null: the first)
    params: list[str] | None = None               # θ channels (null: those that vary in the store)
    window: PosInt = 5                            # 2k + 1 consecutive saved states
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    eta: Annotated[float, Field(gt=0, lt=1)] = 1e-3
    theta_weight: Annotated[float, Field(ge=0)] = 1.0
    # θ's diffusion clock t^(1/theta_lag): θ still noisy when the state's fine scales emerge
    # (kernels/score/schedule.py, docs/train.md); 1 = the state's clock
    theta_lag: Annotated[float, Field(ge=1, allow_inf_nan=False)] = 1.0
    # noise of the W θ copies of a window: "per_frame" (W draws) or "shared" (one draw, as the
    # sampler shows a static θ; static-θ stores only): docs/train.md, docs/smooth.md
    theta_noise: Literal["per_frame", "shared"] = "per_frame"
    batch_size: PosInt = 32                       # global batch, split over ranks
    steps: PosInt = 1000
    optim: OptimConfig = Field(default_factory=OptimConfig)
    checkpoint_every: PosInt = 200
    keep_checkpoints: Annotated[int, Field(ge=1)] = 2
    log_every: PosInt = 20
    validate_every: PosInt = 200
    valid_windows: PosInt = 256
    seed: int = 0
    dtype: Literal["float32", "float64"] = "float32"
    device: Device = "cpu"
    autocast: Literal["none", "bf16"] = "none"    # bf16 autocast (CUDA only)
    threads: PosInt = 1                           # torch threads per rank
    cache_mb: Annotated[int, Field(ge=0)] = 2048  # decoded-chunk cache per rank

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        if not v.strip().endswith(".zarr"):
            raise ValueError("must be a .zarr trajectory store")
        return str(Path(v).expanduser().absolute())

    @model_validator(mode="after")
    def _train(self) -> TrainConfig:
        if self.window % 2 == 0:
            raise _field_error(("window",), "must be odd (2k + 1 states around a centre)")
        if self.autocast == "bf16" and not self.device.startswith("cuda"):
            raise _field_error(("autocast",), "bf16 autocast needs a cuda device")
        return self


STAGES["train"] = TrainConfig


# --------------------------------------------------------------------------------------------
# smooth: SDA posterior sampling of a trajectory window and θ (pipeline/smooth.py)
class SmoothConfig(Strict):
    """``scoreda smooth``: posterior samples of a whole trajectory window and θ, given noisy
    observations of a held-out (test-split) trajectory of a store, with a trained window model."""

    stage: Literal["smooth"] = "smooth"
    model_run: str                                   # run directory of `scoreda train`
    store: str | None = None                         # truth source (null: the training store)
    trajectory: NonNegInt = 0                        # index among the store's test trajectories
    start: NonNegInt = 0                             # first frame of the window
    length: PosInt = 32                              # frames L sampled jointly (≥ the model window)
    observation: ObservationConfig = Field(default_factory=ObservationConfig)
    samples: PosInt = 32                             # posterior samples (split over MPI ranks)
    # samples a rank draws together (null: all of its own at once); each finished batch is
    # committed, so a killed or signalled run resumes with the next (docs/smooth.md)
    batch: PosInt | None = None
    sda: SDAConfig = Field(default_factory=SDAConfig)
    ensf_members: NonNegInt = 0                      # > 0: also filter the same data with EnSF
    observations: ObservationFileConfig | None = None  # y(obs_time, obs) from a file: no truth
    # "observations": states and θ given y (SDA); "truth_states": θ alone given the window's true
    # states, no y (what the network itself reads about θ: a diagnostic, docs/smooth.md)
    condition: Literal["observations", "truth_states"] = "observations"
    # a `scoreda calibrate` output of the same model and set-up: adds calibrated θ intervals
    calibration: str | None = None
    seed: NonNegInt = 0                              # streams (seed, "obs", frame), (seed, "sample", i)
    dtype: Literal["float32", "float64"] = "float32"
    device: Device = "cpu"
    threads: PosInt = 1

    @field_validator("model_run", "store", "calibration")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        return _absolute_path(v)

    @model_validator(mode="after")
    def _condition(self) -> SmoothConfig:
        if self.observation.every > self.length:
            # frames 0, every, 2·every, … of the window: past its end only frame 0 is left
            raise _field_error(("observation", "every"), f"{self.observation.every} is longer than "
                               f"the window (length {self.length}): only its first frame would be "
                               "observed")
        if self.condition == "truth_states" and self.observations is not None:
            raise _field_error(("condition",), "truth_states needs the truth: drop observations")
        if self.condition == "truth_states" and self.calibration is not None:
            raise _field_error(("calibration",), "calibrates intervals from observations; "
                               "condition truth_states has none")
        return self


STAGES["smooth"] = SmoothConfig


class CalibrateConfig(Strict):
    """``scoreda calibrate``: split-conformal θ intervals of a smoothing set-up, from `scoreda
    smooth` outputs of windows whose truth is known (twin runs on held-out trajectories)."""

    stage: Literal["calibrate"] = "calibrate"
    runs: list[str]                                  # smooth outputs (glob patterns allowed)
    level: Annotated[float, Field(gt=0, lt=1)] = 0.9
    pool: Literal["param", "all"] = "param"          # one bound per parameter, or one shared
    evaluate: list[str] = Field(default_factory=list)  # other smooth outputs to test it on

    @field_validator("runs", "evaluate")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        return [str(_absolute_path(p)) for p in v]

    @model_validator(mode="after")
    def _runs(self) -> CalibrateConfig:
        if not self.runs:
            raise _field_error(("runs",), "give at least one smooth output (glob patterns allowed)")
        return self


STAGES["calibrate"] = CalibrateConfig


# --------------------------------------------------------------------------------------------
# submit: whole runs as chained SLURM jobs
_SLURM_TIME = re.compile(r"^(?:(\d+)-(\d{1,2})(?::(\d{1,2})(?::(\d{1,2}))?)?"   # D-H[:M[:S]]
                         r"|(\d+)(?::(\d{1,2})(?::(\d{1,2}))?)?)$")                 # M[:S] | H:M:S


def slurm_seconds(text: str) -> int:
    """Seconds of a SLURM time limit: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``.

    Raises ``ValueError`` for anything else (and for 0: SLURM reads it as "no limit").
    """
    m = _SLURM_TIME.match(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a SLURM time (M, M:S, H:M:S, D-H, D-H:M or D-H:M:S)")
    d, dh, dm, ds, a, b, c = m.groups()
    if d is not None:
        secs = int(d) * 86400 + int(dh) * 3600 + int(dm or 0) * 60 + int(ds or 0)
        parts = [int(dh), int(dm or 0), int(ds or 0)]
        limits = [24, 60, 60]
    elif c is not None:  # H:M:S
        secs, parts, limits = int(a) * 3600 + int(b) * 60 + int(c), [int(b), int(c)], [60, 60]
    elif b is not None:  # M:S
        secs, parts, limits = int(a) * 60 + int(b), [int(b)], [60]
    else:  # M
        secs, parts, limits = int(a) * 60, [], []
    if any(p >= lim for p, lim in zip(parts, limits, strict=True)):
        raise ValueError(f"{text!r}: a field is out of range")
    if secs <= 0:
        raise ValueError(f"{text!r}: a time limit must be positive")
    return secs


def _check_slurm_time(v: str) -> str:
    slurm_seconds(v)
    return v.strip()


SlurmTime = Annotated[str, AfterValidator(_check_slurm_time)]


class SiteConfig(Strict):
    """What differs between clusters; the job templates never hold any of it."""

    partition: str | None = None            # null: the cluster's default partition
    account: str | None = None
    qos: str | None = None
    time: SlurmTime = "01:00:00"            # default time limit of every job
    gpus_per_node: NonNegInt = 0            # GPUs a node has (jobs asking more are refused)
    modules: list[str] = Field(default_factory=list)  # `module load` each, in order
    setup: list[str] = Field(default_factory=list)    # shell lines before the command
    sbatch: list[str] = Field(default_factory=list)   # extra #SBATCH options, e.g. --constraint=x
    scoreda: str | None = None              # scoreda on the nodes (null: the one submitting)
    templates: str | None = None            # a directory of own job templates (null: jobs/)

    @field_validator("sbatch")
    @classmethod
    def _options(cls, v: list[str]) -> list[str]:
        for opt in v:
            if not opt.startswith("-") or "\n" in opt:
                raise ValueError(f"{opt!r} is not one sbatch option (e.g. --constraint=cpu)")
        return v


class JobSpec(Strict):
    """Resources of one stage's job."""

    config: str | None = None               # the stage's config (file or shipped example name)
    nodes: PosInt = 1
    ntasks: PosInt = 1                      # ranks (srun tasks)
    cpus_per_task: PosInt = 1
    gpus: NonNegInt = 0                     # GPUs per node
    mem: str | None = None                  # e.g. 16G (null: the partition's default)
    time: SlurmTime | None = None           # null: site.time

    @field_validator("mem")
    @classmethod
    def _mem(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"\d+[KMGT]?", v):
            raise ValueError(f"{v!r} is not a SLURM memory size (e.g. 4000, 16G)")
        return v


class ResumableJobSpec(JobSpec):
    """A stage that checkpoints and exits 3 on SIGUSR1: its job requeues itself until done."""

    signal_lead: PosInt = 120               # seconds before the time limit SLURM sends USR1
    max_requeues: NonNegInt = 20            # give up (fail) after this many requeues


class SmoothJobSpec(ResumableJobSpec):
    """SDA smoothing of test windows: one array task per window, each on ``ntasks`` ranks (every
    rank draws its slice of the samples). A rerun skips windows already written; USR1 stops a
    window after its current batch of samples (``batch`` in the smooth config) and the task
    requeues itself to draw the rest."""

    trajectories: list[NonNegInt] = Field(default_factory=list)  # [] = the config's trajectory

    @field_validator("trajectories")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("repeated test trajectories (one window each)")
        return v


class BenchJobSpec(JobSpec):
    """The scaling sweep: one array task per rank count, then a gather job."""

    suites: list[Literal["campaign", "train"]] = Field(default_factory=lambda: ["campaign", "train"])
    ranks: list[PosInt] = Field(default_factory=lambda: [1, 2])
    quick: bool = False                     # small sizes (tests)
    repeats: PosInt = 3


class SubmitConfig(Strict):
    """``scoreda submit``: stages of one run as SLURM jobs chained with afterok."""

    stage: Literal["submit"] = "submit"
    site: SiteConfig = Field(default_factory=SiteConfig)
    generate: JobSpec | None = None
    train: ResumableJobSpec | None = None
    campaign: ResumableJobSpec | None = None
    smooth: SmoothJobSpec | None = None
    calibrate: JobSpec | None = None
    bench: BenchJobSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> SubmitConfig:
        for name in ("generate", "train", "campaign", "smooth", "calibrate"):
            spec = getattr(self, name)
            if spec is not None and spec.config is None:
                raise _field_error((name, "config"), "required for this stage")
        if self.calibrate is not None and (self.calibrate.ntasks > 1 or self.calibrate.nodes > 1):
            raise _field_error(("calibrate", "ntasks"), "calibrate runs as one process (one node, "
                               "one task)")
        for name in ("generate", "train", "campaign", "smooth", "calibrate", "bench"):
            spec = getattr(self, name)
            if spec is None:
                continue
            if spec.gpus > self.site.gpus_per_node:
                raise _field_error((name, "gpus"), f"{spec.gpus} GPUs per node asked, the site "
                                   f"has {self.site.gpus_per_node} (site.gpus_per_node)")
            if spec.ntasks < spec.nodes:
                raise _field_error((name, "ntasks"), f"{spec.ntasks} tasks on {spec.nodes} nodes")
            limit = slurm_seconds(spec.time or self.site.time)
            lead = getattr(spec, "signal_lead", None)
            if lead is not None and lead >= limit:
                raise _field_error((name, "signal_lead"), f"{lead} s is not shorter than the time "
                                   f"limit ({limit} s)")
        if self.bench is not None and len(set(self.bench.ranks)) != len(self.bench.ranks):
            raise _field_error(("bench", "ranks"), "repeated rank counts")
        return self


STAGES["submit"] = SubmitConfig


# --------------------------------------------------------------------------------------------
# surrogate: ML surrogates with EnSF / EnKF-corrected roll-outs and retraining (pipeline/surrogate.py)
class SurrogateDataConfig(Strict):
    """True trajectories made in-process from ``kernels.dynamics`` (cheap for the 1-D models),
    or the training ones read from a ``scoreda generate`` store (``store``).

    Training trajectory ``j`` starts from the stream ``(seed, "train", j)``, test trajectory
    (trial) ``i`` from ``(seed, "test", i)``: independent random starts, each spun up onto the
    attractor, so the truth of a trial is never a training trajectory.
    """

    trajectories: PosInt = 16                    # training trajectories
    frames: Annotated[int, Field(ge=2)] = 1000   # saved frames per training trajectory
    save_every: PosInt = 5                       # model steps per saved frame (= one surrogate step)
    spinup: NonNegInt = 1000                     # model steps discarded before the first frame
    seed: NonNegInt = 0
    # a `scoreda generate` store (theta.mode fixed, same model, dt and save_every) to take the
    # training trajectories from (its train split, the first `trajectories`, `frames` frames);
    # null: made in-process. Test truths are always made in-process (streams "test").
    store: str | None = None

    @field_validator("store")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        return _absolute_path(v)


class RegimeConfig(Strict):
    """Which training data the surrogate gets.

    ``accurate``: every trajectory, clean. ``noisy``: every trajectory plus N(0, noise_std²) on
    every frame (inputs and targets alike, stream ``(seed, "target-noise", j)``).
    ``insufficient``: only ``trajectories`` trajectories, the first ``frames`` frames of each,
    and/or ``steps`` optimiser steps (few epochs).
    """

    kind: Literal["accurate", "noisy", "insufficient"] = "accurate"
    noise_std: Annotated[float, Field(ge=0)] = 0.0
    trajectories: PosInt | None = None
    frames: Annotated[int, Field(ge=2)] | None = None
    steps: PosInt | None = None

    @model_validator(mode="after")
    def _regime(self) -> RegimeConfig:
        if self.kind == "noisy" and self.noise_std == 0:
            raise _field_error(("noise_std",), "must be > 0 for kind 'noisy'")
        if self.kind != "noisy" and self.noise_std != 0:
            raise _field_error(("noise_std",), f"only used with kind 'noisy' (kind is {self.kind!r})")
        limits = (self.trajectories, self.frames, self.steps)
        if self.kind == "insufficient" and all(v is None for v in limits):
            raise _field_error(("kind",), "'insufficient' needs trajectories, frames or steps")
        if self.kind != "insufficient" and any(v is not None for v in limits):
            raise _field_error(("trajectories",), "trajectories/frames/steps limit the data only "
                               f"with kind 'insufficient' (kind is {self.kind!r})")
        return self


class SurrogateNetworkConfig(Strict):
    """``kernels.surrogate.build_surrogate(kind, history, **options)``."""

    kind: Literal["conv", "mlp"] = "conv"
    history: PosInt = 2                          # past frames the network reads
    options: dict[str, Any] = Field(default_factory=dict)


class SurrogateTrainingConfig(Strict):
    """AdamW with cosine decay; the global batch is reduced in a fixed order (docs/surrogate.md)."""

    steps: PosInt = 3000
    batch_size: PosInt = 128                     # global batch
    chunks: PosInt = 4                           # fixed sub-batches: at most this many ranks share
                                                 # a step, and 1..chunks ranks give equal weights
    lr: Annotated[float, Field(gt=0)] = 2e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    warmup: NonNegInt = 100
    unroll: PosInt = 1                           # roll-out length of the loss
    grad_clip: Annotated[float, Field(gt=0)] | None = 1.0

    @model_validator(mode="after")
    def _chunks(self) -> SurrogateTrainingConfig:
        if self.chunks > self.batch_size:
            raise _field_error(("chunks",), f"{self.chunks} is more than batch_size ({self.batch_size})")
        return self


class SurrogateObservationConfig(Strict):
    """One observation network of the filtered roll-out (``kernels.observe.make_operator``)."""

    kind: Literal["identity", "every_kth", "random_mask", "coarse_pool"] = "identity"
    options: dict[str, Any] = Field(default_factory=dict)
    nonlinearity: Literal["arctan", "saturation"] | None = "arctan"
    sigma: Annotated[float, Field(gt=0)] = 0.05


class SurrogateFilterConfig(FilterConfig):
    """An analysis of the filtered roll-out: ``filter`` keys of ``assimilate``, with defaults of
    ``kernels.surrogate.default_filter`` (inflation 1.05), plus additive model noise."""

    method: Literal["ensf", "letkf", "enkf"] = "ensf"
    inflation: Annotated[float, Field(ge=1)] = 1.05
    additive_std: Annotated[float, Field(ge=0)] = 0.0   # N(0, std²) added to every forecast


class SurrogateRolloutConfig(Strict):
    """Evaluation: plain and filtered roll-outs of held-out truths, ``trials`` times."""

    trials: Annotated[int, Field(ge=1)] = 5
    horizon: PosInt = 200                        # surrogate steps after the true initial window
    score_from: NonNegInt | None = None          # long-horizon RMSE = mean over leads ≥ this
                                                 # (null: horizon // 2)
    members: Annotated[int, Field(ge=2)] = 20
    spread: Annotated[float, Field(ge=0)] = 0.5  # initial ensemble: truth window + N(0, spread²)
    assimilate: NonNegInt = 15                   # assimilation steps per cycle
    forecast: NonNegInt = 5                      # forecast-only steps per cycle
    bounds: Annotated[float, Field(gt=0)] | None = 4.0   # clamp members to mean ± bounds·std
                                                         # of the training data (null: none)
    reference: bool = False                      # also run every filter with the true model as
                                                 # the forecast: what the observations allow
    observations: dict[str, SurrogateObservationConfig] = Field(
        default_factory=lambda: {"full": SurrogateObservationConfig()})
    filters: dict[str, SurrogateFilterConfig] = Field(
        default_factory=lambda: {"ensf": SurrogateFilterConfig(
            method="ensf", ensf=EnSFConfig(ridge=1e-3))})

    @model_validator(mode="after")
    def _rollout(self) -> SurrogateRolloutConfig:
        if self.assimilate + self.forecast == 0:
            raise _field_error(("assimilate",), "assimilate + forecast must be > 0")
        if self.score_from is not None and self.score_from >= self.horizon:
            raise _field_error(("score_from",), f"{self.score_from} leaves no lead to score "
                               f"(horizon = {self.horizon})")
        for group, names in (("observations", self.observations), ("filters", self.filters)):
            if not names:
                raise _field_error((group,), "give at least one")
            for name in names:
                if not re.match(r"^[A-Za-z0-9_-]+$", name):
                    raise _field_error((group, name), "names may use letters, digits, _ and -")
        for name, f in self.filters.items():
            if f.method == "letkf" and self.members < 3:
                raise _field_error(("filters", name, "method"), "LETKF needs at least 3 members")
        return self


class RetrainConfig(Strict):
    """DA in training: filter the training-period observations with the current surrogate, take
    the analyses as new targets, fine-tune, re-evaluate; ``iterations`` times."""

    iterations: NonNegInt = 2
    filter: str = "ensf"                         # a name in rollout.filters
    observation: str = "full"                    # a name in rollout.observations
    trajectories: PosInt | None = None           # training trajectories filtered (null: all)
    frames: Annotated[int, Field(ge=2)] | None = None   # frames filtered per trajectory (null: all)
    burn_in: NonNegInt = 20                      # first analyses not used as targets
    steps: PosInt = 500                          # fine-tuning steps per iteration
    lr: Annotated[float, Field(gt=0)] = 5e-4
    include_data: bool = True                    # fine-tune on the training pairs + the analyses


class SurrogateConfig(Strict):
    """``scoreda surrogate``: train a surrogate, evaluate plain and EnSF/EnKF-corrected roll-outs
    against held-out truths, retrain on analyses; restartable run directory (docs/surrogate.md)."""

    stage: Literal["surrogate"] = "surrogate"
    model: ModelConfig
    data: SurrogateDataConfig = Field(default_factory=SurrogateDataConfig)
    regime: RegimeConfig = Field(default_factory=RegimeConfig)
    network: SurrogateNetworkConfig = Field(default_factory=SurrogateNetworkConfig)
    training: SurrogateTrainingConfig = Field(default_factory=SurrogateTrainingConfig)
    rollout: SurrogateRolloutConfig = Field(default_factory=SurrogateRolloutConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    seed: NonNegInt = 0                          # weights, batches, observations, filters
    dtype: DType = "float32"
    threads: PosInt = 1                          # torch threads per rank

    @model_validator(mode="after")
    def _surrogate(self) -> SurrogateConfig:
        if self.model.name not in ("lorenz96", "kdv"):
            raise _field_error(("model", "name"), f"surrogates are set up for lorenz96 and kdv, "
                               f"not {self.model.name!r}")
        d, reg, ro, rt = self.data, self.regime, self.rollout, self.retrain
        if reg.trajectories is not None and reg.trajectories > d.trajectories:
            raise _field_error(("regime", "trajectories"), f"{reg.trajectories} is more than "
                               f"data.trajectories ({d.trajectories})")
        if reg.frames is not None and reg.frames > d.frames:
            raise _field_error(("regime", "frames"), f"{reg.frames} is more than data.frames "
                               f"({d.frames})")
        need = self.network.history + self.training.unroll
        frames = reg.frames or d.frames
        if frames < need:
            raise _field_error(("data", "frames"), f"{frames} frames are fewer than history + "
                               f"unroll ({need})")
        if rt.filter not in ro.filters:
            raise _field_error(("retrain", "filter"), f"{rt.filter!r} is not in rollout.filters "
                               f"({', '.join(ro.filters)})")
        if rt.observation not in ro.observations:
            raise _field_error(("retrain", "observation"), f"{rt.observation!r} is not in "
                               f"rollout.observations ({', '.join(ro.observations)})")
        if rt.trajectories is not None and rt.trajectories > d.trajectories:
            raise _field_error(("retrain", "trajectories"), f"{rt.trajectories} is more than "
                               f"data.trajectories ({d.trajectories})")
        if rt.frames is not None and rt.frames > d.frames:
            raise _field_error(("retrain", "frames"), f"{rt.frames} is more than data.frames "
                               f"({d.frames})")
        if rt.iterations and (rt.frames or d.frames) <= self.network.history + rt.burn_in:
            raise _field_error(("retrain", "burn_in"), "leaves no analyses to train on")
        from kernels.observe import make_operator
        from kernels.surrogate import build_surrogate

        model = self.model.build()
        for name, obs in ro.observations.items():
            try:
                make_operator(obs.kind, model.state_shape, nonlinearity=obs.nonlinearity,
                              **obs.options)
            except (TypeError, ValueError) as exc:
                raise _field_error(("rollout", "observations", name, "options"), str(exc)) from None
        net = self.network
        if "size" in net.options:
            raise _field_error(("network", "options", "size"), "set from model.size")
        try:
            build_surrogate(net.kind, history=net.history, size=int(self.model.size), **net.options)
        except (TypeError, ValueError) as exc:
            raise _field_error(("network", "options"), str(exc)) from None
        return self


STAGES["surrogate"] = SurrogateConfig
