"""Pipeline stages, one module each with a single public ``run(cfg, run_dir)``, declared
to the pipeline as a :class:`privimage.io.artifacts.Stage` (``SPEC``).

Stages talk only through files in the run directory (see each module's docstring for
the fixed names it reads and writes), never through in-memory objects, and no stage
imports another.
"""

from privimage.config.schema import Config
from privimage.io.artifacts import STAGES, Stage
from privimage.stages import audit, evaluate, finetune, pretrain, query, sample, sample_bnstat

# The stages in pipeline order (io.artifacts.STAGES names their folders).
PIPELINE: tuple[Stage, ...] = tuple(
    m.SPEC for m in (query, pretrain, finetune, sample, evaluate, audit)
)
assert tuple(s.name for s in PIPELINE) == STAGES


def stage_spec(cfg: Config, name: str) -> Stage:
    """The stage called ``name`` under ``cfg``: the synthesizer picks the sample stage
    (BN-statistics synthesis writes the same files as diffusion sampling)."""
    if name == "sample" and cfg.synthesizer == "bnstat":
        return sample_bnstat.SPEC
    return next(s for s in PIPELINE if s.name == name)
