"""The training components' decorator: qfm_component plus the Kubeflow Trainer launcher (pipelines.trainjob),
embedded the same way, so a training step can either train in its own pod or launch and follow a TrainJob."""

from kfp import dsl

from components.base import DEFAULT_IMAGE, load_section, local_manifest, log_training_metrics, note_summary
from pipelines.trainjob import (
    follow_trainjob,
    node_command,
    object_store_uri,
    run_node,
    secret_env,
    train_on_trainjob,
    trainjob_request,
    trainjob_wanted,
)

TRAINJOB_FUNCS = [trainjob_wanted, object_store_uri, run_node, node_command, secret_env, trainjob_request,
                  follow_trainjob, train_on_trainjob]


def training_component(func):
    """@dsl.component on the project image with base.py's helpers and the TrainJob launcher embedded."""
    return dsl.component(func, base_image=DEFAULT_IMAGE, install_kfp_package=False,
                         additional_funcs=[load_section, local_manifest, note_summary, log_training_metrics,
                                           *TRAINJOB_FUNCS])
