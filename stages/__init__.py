"""One module per stage; importing this package registers them all in ``STAGES``.

Registration order is the DAG's topological order.
"""
from .base import STAGES, StageContext, StageResult, StageSpec  # noqa: F401
from . import box_seeds, cam_train, cam, seeds, affinity_train, graph, random_walk, a2gnn, crf  # noqa: F401,E402
from . import final_train, final_eval, instances, instance_train  # noqa: F401,E402
from . import dfr_train, dfr_eval  # noqa: F401,E402
