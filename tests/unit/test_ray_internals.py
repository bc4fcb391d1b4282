"""Ray's private pieces stay in :mod:`serving.ray_internals`, and every one it relies on is still where it expects.

Before: private Ray names were spread over five serving modules (``RequestMetadata`` in ``replicas.py``,
``_get_global_client`` and ``__ray_call__`` in ``rollout.py``, ``ray.llm._internal`` builders and
``serve.delete(_blocking=...)`` in ``deploy.py`` and ``app.py``, Ray's private ingress methods overridden in
``ingress.py``), Serve's deployment naming was rebuilt by hand in ``deploy.py``, and the checks that they still
existed were two tests in two tiers (one only ran with the Ray/vLLM tier), each covering part of them.

Nothing here starts or joins a Ray cluster.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("rlhf", "serving", "cluster")
INTERNALS = ROOT / "serving" / "ray_internals.py"


# ---- only serving/ray_internals.py touches private Ray names ---------------------------------------------------------


def _is_ray(module: str) -> bool:
    return module == "ray" or module.startswith("ray.")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _root(node: ast.expr) -> ast.expr:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node


def _ray_names(tree: ast.AST) -> tuple[set[str], list[str]]:
    """The names the imports of ``tree`` bind to Ray modules or to things from them, and the private imports."""
    names: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_ray(alias.name):
                    names.add((alias.asname or alias.name).split(".")[0])
                    if any(_private(part) for part in alias.name.split(".")):
                        found.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _is_ray(node.module):
            if any(_private(part) for part in node.module.split(".")):
                found.append(f"line {node.lineno}: from {node.module} import ...")
            for alias in node.names:
                names.add(alias.asname or alias.name)
                if _private(alias.name):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
    return names, found


def _private_members(cls: ast.ClassDef) -> list[str]:
    """A class deriving from a Ray class: the private members of its base it defines, calls on super() or reads."""
    own = {
        target.attr
        for node in ast.walk(cls)
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
    }
    found = [f"line {item.lineno}: overrides {cls.name}.{item.name}" for item in cls.body if _is_private_def(item)]
    for node in ast.walk(cls):
        if not (isinstance(node, ast.Attribute) and _private(node.attr)):
            continue
        value = node.value
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super":
            found.append(f"line {node.lineno}: super().{node.attr}")
        elif isinstance(value, ast.Name) and value.id == "self" and node.attr not in own:
            found.append(f"line {node.lineno}: self.{node.attr}")
    return found


def _is_private_def(node: ast.stmt) -> bool:
    return isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _private(node.name)


def private_ray_uses(source: str) -> list[str]:
    """Where ``source`` touches a private Ray name: an import from a ``_`` module of Ray or of a ``_`` name from
    Ray, an attribute ``_x`` of a Ray name, a ``_`` keyword argument to a Ray function, ``__ray_call__``, or a
    private member of a Ray base class (defined, called on ``super()`` or read from ``self``)."""
    tree = ast.parse(source)
    ray_names, found = _ray_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "__ray_call__":
            found.append(f"line {node.lineno}: .__ray_call__")
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            root = _root(node)
            if isinstance(root, ast.Name) and root.id in ray_names:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and isinstance(root := _root(node.func), ast.Name) and root.id in ray_names:
            found += [f"line {node.lineno}: {kw.arg}=" for kw in node.keywords if kw.arg and _private(kw.arg)]
        elif isinstance(node, ast.ClassDef) and any(
            isinstance(root := _root(base), ast.Name) and root.id in ray_names for base in node.bases
        ):
            found += _private_members(node)
    return sorted(set(found), key=lambda text: int(text.split(":")[0].split()[1]))


def test_only_serving_ray_internals_touches_private_ray_names() -> None:
    sources = sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py") if path != INTERNALS)
    uses = {str(p.relative_to(ROOT)): found for p in sources if (found := private_ray_uses(p.read_text()))}
    assert not uses, f"private Ray names outside serving/ray_internals.py (wrap them there): {uses}"


SUBCLASS = "from ray.serve.llm.ingress import OpenAiIngress\nclass I(OpenAiIngress):\n"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from ray.serve._private.common import RequestMetadata", 1),
        ("import ray._private.state", 1),
        ("from ray.llm._internal.serve.core.ingress.ingress import init", 1),
        ("from ray.serve.context import _get_global_client", 1),
        ("import ray\nray._private.worker.global_worker", 1),
        ("from ray import serve\nserve.delete('app', _blocking=False)", 1),
        ("actor.__ray_call__.remote(f)", 1),
        (SUBCLASS + "    def _get_model_id(self): ...", 1),
        (SUBCLASS + "    def f(self):\n        return super()._get_model_id(), self._model_cards", 2),
        (SUBCLASS + "    def __init__(self):\n        self._mine = 1\n    def f(self):\n        return self._mine", 0),
        ("import ray\nfrom ray import serve\nray.get(ref, timeout=1)\nserve.status().applications", 0),
        ("from serving.ray_internals import call_replica\ncall_replica('a', 'b', 'c')", 0),
        ("class Mine:\n    def _helper(self): ...\nMine()._helper(_flag=1)", 0),
    ],
)
def test_the_check_finds_private_ray_names(source: str, expected: int) -> None:
    assert len(private_ray_uses(source)) == expected, private_ray_uses(source)


# ---- the internals serving/ray_internals.py relies on --------------------------------------------------------------


def test_the_serve_replica_internals_it_relies_on() -> None:
    """call_replica, replica_actor, run_on_replica_actor, serve_controller_running, serve_instance_details,
    delete_application; and the LLMServer methods they call by name."""
    from ray import serve
    from ray.actor import _modify_class
    from ray.serve._private.client import ServeControllerClient
    from ray.serve._private.common import RequestMetadata
    from ray.serve._private.constants import SERVE_NAMESPACE
    from ray.serve._private.replica import ReplicaActor
    from ray.serve.context import _get_global_client
    from ray.serve.llm import LLMServer
    from ray.serve.llm.openai_api_models import CompletionRequest
    from ray.serve.schema import ApplicationDetails, DeploymentDetails, ReplicaDetails, ServeInstanceDetails

    fields = {field.name for field in dataclasses.fields(RequestMetadata)}
    assert {"request_id", "internal_request_id", "call_method", "app_name", "is_streaming"} <= fields
    for entry in ("handle_request", "handle_request_streaming"):
        assert list(inspect.signature(getattr(ReplicaActor, entry)).parameters)[1] == "pickled_request_metadata"
    assert isinstance(SERVE_NAMESPACE, str) and SERVE_NAMESPACE
    ray_call = inspect.signature(_modify_class(type("Probe", (), {})).__ray_call__)
    assert [p.kind for p in ray_call.parameters.values()][1:] == [
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
        inspect.Parameter.VAR_KEYWORD,
    ]
    assert "raise_if_no_controller_running" in inspect.signature(_get_global_client).parameters
    assert callable(ServeControllerClient.get_serve_details)
    assert "applications" in ServeInstanceDetails.model_fields
    assert "deployments" in ApplicationDetails.model_fields and "replicas" in DeploymentDetails.model_fields
    assert {"replica_id", "actor_name", "state", "pid", "node_ip"} <= set(ReplicaDetails.model_fields)
    assert "_blocking" in inspect.signature(serve.delete).parameters
    assert {"completions", "pause", "resume", "collective_rpc", "reset_prefix_cache"} <= set(dir(LLMServer))
    assert {"method", "timeout", "kwargs"} <= set(inspect.signature(LLMServer.collective_rpc).parameters)
    assert {"return_token_ids", "prompt_logprobs", "logprobs", "seed"} <= set(CompletionRequest.model_fields)


def test_llm_deployment_id_is_how_build_llm_deployment_names_the_deployment(cluster_context: None) -> None:
    """The rollout client finds its model's deployment by this name (serving.deploy._llm_deployment); building
    asks Ray for the driver's runtime env, which ``cluster_context`` gives without starting a cluster."""
    from ray.llm._internal.serve.core.server.builder import _get_deployment_name
    from ray.serve.llm import LLMConfig, build_llm_deployment

    from serving.ray_internals import llm_deployment_id

    config = LLMConfig(model_loading_config={"model_id": "org/model.v1"})
    assert llm_deployment_id("org/model.v1") == _get_deployment_name(config) == "org--model_v1"
    name = build_llm_deployment(config)._bound_deployment.name
    assert name.endswith(":" + llm_deployment_id("org/model.v1")), name


def test_the_engine_class_runs_one_engine_process_on_cpus_and_skips_the_node_task(tiny_model_dir: Path) -> None:
    """engine_class: what it overrides is still there, it pickles by reference, and on a CPU config it picks
    vLLM's ``uni`` executor where Ray's engine picks ``mp`` (the live replicas' processes and logs are checked in
    tests/serving/test_rollout.py::test_a_replica_starts_one_engine_process_and_no_node_task)."""
    import pickle

    from ray.llm._internal.common.callbacks.base import CallbackCtx
    from ray.llm._internal.common.utils.cloud_utils import is_remote_path
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine

    from serving.app import llm_config
    from serving.config import ServeConfig
    from serving.ray_internals import engine_class

    engine_cls = engine_class()
    assert issubclass(engine_cls, VLLMEngine) and pickle.loads(pickle.dumps(engine_cls)) is engine_cls
    assert CallbackCtx().run_init_node is True and "callback.ctx.run_init_node" in inspect.getsource(VLLMEngine.start)
    assert list(inspect.signature(VLLMEngine._prepare_engine_config).parameters) == ["self", "callback_ctx"]
    assert is_remote_path("s3://bucket/model") and not is_remote_path(str(tiny_model_dir))
    assert not is_remote_path("HuggingFaceTB/SmolLM2-135M-Instruct")

    config = llm_config(ServeConfig(model=str(tiny_model_dir), max_model_len=256), gpu=False)
    backends = {}
    for cls in (VLLMEngine, engine_cls):
        _, _, vllm_config = cls(config)._prepare_engine_config(CallbackCtx())
        backends[cls] = vllm_config.parallel_config.distributed_executor_backend
    assert backends == {VLLMEngine: "mp", engine_cls: "uni"}


def test_the_replica_app_internals_it_relies_on() -> None:
    """What :class:`serving.ingress.GuardedLLMServer` relies on beyond ``ray.serve.llm``'s public names: the replica's
    ``engine`` (set by ``LLMServer``'s constructor, which starts it) and the engine's ``build_asgi_app``; and the
    public names it uses in their place."""
    from ray import serve
    from ray.llm._internal.serve.core.server.llm_server import LLMServer as InternalLLMServer
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
    from ray.serve.llm import LLMServer, build_llm_deployment

    from serving.ingress import GuardedLLMServer

    assert issubclass(LLMServer, InternalLLMServer)
    assert inspect.iscoroutinefunction(LLMServer.__init__) and inspect.iscoroutinefunction(VLLMEngine.build_asgi_app)
    assert {"llm_config", "engine_cls"} <= set(inspect.signature(LLMServer.__init__).parameters)
    assert "self.engine = " in inspect.getsource(InternalLLMServer)
    assert {"deployment_cls", "name_prefix", "bind_kwargs"} <= set(inspect.signature(build_llm_deployment).parameters)
    assert "__serve_build_asgi_app__" in vars(GuardedLLMServer)
    serve.ingress()(GuardedLLMServer)  # a late-bound ingress: Serve asks the class for its app
