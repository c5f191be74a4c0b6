"""Pipeline stages, one module each with a single public ``run(cfg, run_dir)``.

Stages talk only through files in the run directory (see each module's docstring for
the fixed names it reads and writes), never through in-memory objects.
"""

from privimage.stages import audit, evaluate, finetune, pretrain, query, sample

STAGE_MODULES = {
    "query": query,
    "pretrain": pretrain,
    "finetune": finetune,
    "sample": sample,
    "evaluate": evaluate,
    "audit": audit,
}
