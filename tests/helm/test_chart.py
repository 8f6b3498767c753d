"""The Helm chart, rendered and checked without a cluster.

Every values file (the defaults, the CPU demo file, and one per feature under helm/pagoda/ci/) is
rendered with the Helm library (helm-python-sdk, `helm template`'s code path) for the oldest and the
newest Kubernetes minor the chart supports, linted strictly, and every object is validated: the
built-in kinds against Kubernetes' schemas (kubernetes-validate, strict) and the custom resources
against the operators' own schemas (@kubernetes-models, in Node). Then the tests check what no
schema catches: selectors match the pods, autoscalers target the workload, the startup budget
covers the declared startup time, names fit in 63 characters, the pods run locked down.
"""

import copy
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import tempfile

import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "pagoda"
NODE_MODULES = ROOT / ".ci" / "cache" / "node" / "node_modules"
# The oldest and the newest Kubernetes minor the chart supports (Chart.yaml's kubeVersion).
KUBE_VERSIONS = ["1.30.0", "1.37.0"]
PROMETHEUS_OPERATOR_API = ["monitoring.coreos.com/v1"]
VALUES_FILES = ["(defaults)", "values-cpu.yaml"] + sorted(f"ci/{p.name}" for p in (CHART / "ci").glob("*.yaml"))

# The Helm library wants a writable home for its config and cache.
os.environ["HOME"] = tempfile.mkdtemp(prefix="pagoda-helm-home-")

from helm_python import Chart, Config, HelmError, _native, lint  # noqa: E402


class Renderer:
    """Keeps the chart and the configuration alive across native calls (the library frees
    handles whose Python objects are gone)."""

    def __init__(self):
        self.chart = Chart.load(str(CHART))
        self.config = Config(storage_driver="memory")

    def install(self, values, kube_version=KUBE_VERSIONS[-1], api_versions=(), name="rel"):
        """`helm template`: the manifest's objects (hooks excluded) and the notes."""
        handle, ref = self.config._chart_args(self.chart)
        options = {
            "dry_run": "client",
            "namespace": "serving",
            "kube_version": kube_version,
            "api_versions": list(api_versions),
        }
        payload = _native.call_string(
            "helm_install", self.config._raw(), self.config._context_arg(None), handle, ref, name,
            json.dumps(values), json.dumps(options),
        )
        release = json.loads(payload)
        docs = [d for d in yaml.safe_load_all(release["manifest"]) if d]
        return docs, release["notes"]

    def hooks(self, values, name="rel"):
        """The helm test pods, which `install` leaves out of the manifest."""
        rendered = self.chart.render(values, name=name, namespace="serving")
        return [
            d
            for path, text in rendered.items()
            if "/templates/tests/" in path
            for d in yaml.safe_load_all(text)
            if d
        ]


@pytest.fixture(scope="module")
def renderer():
    return Renderer()


def load_values(name):
    if name == "(defaults)":
        return {}
    return yaml.safe_load((CHART / name).read_text()) or {}


def merged(overrides):
    """values.yaml with `overrides` merged in, as Helm merges them."""
    def merge(base, extra):
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                merge(base[key], value)
            else:
                base[key] = value
        return base
    return merge(copy.deepcopy(yaml.safe_load((CHART / "values.yaml").read_text())), overrides)


def model_dir(mount_path, uri):
    """The cache folder of one model URI (the chart's `pagoda.modelDir`)."""
    return f"{mount_path.rstrip('/')}/models/{hashlib.sha256(uri.encode()).hexdigest()[:16]}"


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind):
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def workload_of(docs):
    workloads = by_kind(docs, "Deployment") + by_kind(docs, "StatefulSet")
    assert len(workloads) == 1, "exactly one workload"
    return workloads[0]


def check_semantics(docs, values, kube_version):
    """What schemas cannot check."""
    v = merged(values)
    workload = workload_of(docs)
    pod = workload["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    pod_spec = pod["spec"]
    assert workload["kind"] == v["workload"]["kind"]
    assert selects(workload["spec"]["selector"]["matchLabels"], pod_labels), "the workload selects its own pods"

    for service in by_kind(docs, "Service"):
        assert selects(service["spec"]["selector"], pod_labels), f"Service {service['metadata']['name']} selects the pods"
        assert service["spec"]["ports"][0]["targetPort"] == "http"
    container = next(c for c in pod_spec["containers"] if c["name"] == "pagoda")
    assert any(p["name"] == "http" for p in container["ports"])

    for pdb in by_kind(docs, "PodDisruptionBudget"):
        assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels), "the PDB selects the pods"
    for policy in by_kind(docs, "NetworkPolicy"):
        assert selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels), "the NetworkPolicy applies to the pods"
    for monitor in by_kind(docs, "ServiceMonitor"):
        service = next(s for s in by_kind(docs, "Service") if "clusterIP" not in s["spec"])
        assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        assert monitor["spec"]["endpoints"][0]["port"] == "http"
    for monitor in by_kind(docs, "PodMonitor"):
        assert selects(monitor["spec"]["selector"]["matchLabels"], pod_labels)

    # Autoscalers target the workload, and the workload leaves the count to them.
    autoscalers = by_kind(docs, "HorizontalPodAutoscaler") + by_kind(docs, "ScaledObject")
    assert len(autoscalers) <= 1, "never both an HPA and KEDA"
    for scaler in autoscalers:
        target = scaler["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == (workload["kind"], workload["metadata"]["name"])
        assert "replicas" not in workload["spec"], "no replicas field with an autoscaler"
    if not autoscalers:
        assert workload["spec"]["replicas"] == v["workload"]["replicas"]
    for hpa in by_kind(docs, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm:num_requests_waiting"
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

    # The startup probe covers the declared startup time, and the rollout deadline covers it.
    startup = container["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"] + startup.get("initialDelaySeconds", 0)
    assert budget >= v["model"]["expectedStartupSeconds"], f"startup budget {budget} s"
    assert startup["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    if workload["kind"] == "Deployment":
        assert workload["spec"]["progressDeadlineSeconds"] > budget
    # The drain fits in the grace period.
    drain = v["server"]["shutdownTimeoutSeconds"] + container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod_spec["terminationGracePeriodSeconds"] > drain

    # Names fit Kubernetes' 63-character limits (StatefulSet pods add "-<ordinal>").
    for doc in docs:
        name = doc["metadata"]["name"]
        assert len(name) <= 63, f"{doc['kind']} name {name!r} is too long"
        for key, value in doc["metadata"].get("labels", {}).items():
            assert len(str(value)) <= 63, f"label {key}={value!r}"
    if workload["kind"] == "StatefulSet":
        assert len(workload["metadata"]["name"]) <= 52, "StatefulSet names leave room for the revision hash label"

    # Locked down: non-root, read-only root, no capabilities, seccomp; writable mounts only.
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch", "a large cache is not re-owned at every start"
    assert pod_spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod_spec["automountServiceAccountToken"] is False
    for c in pod_spec["containers"] + pod_spec.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])
    shm = next(vol for vol in pod_spec["volumes"] if vol["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]

    # GPUs and their toleration, served on with the values' memory share; or neither, on the CPU.
    gpu = v["gpu"]["resourceName"]
    args = container["args"]
    flag = lambda name: args[args.index(name) + 1]  # noqa: E731
    sync_env = {e["name"]: e.get("value") for i in pod_spec.get("initContainers", []) for e in i.get("env", [])}
    if v["gpu"]["enabled"]:
        assert container["resources"]["limits"][gpu] == str(v["gpu"]["count"])
        assert any(t.get("key") == gpu for t in pod_spec["tolerations"])
        assert flag("--device") == "cuda"
        assert float(flag("--gpu-memory-utilization")) == v["gpu"]["memoryUtilization"]
        assert flag("--tensor-parallel-size") == str(v["gpu"]["count"])
        for init in pod_spec.get("initContainers", []):
            # The sync never holds a GPU, even where NVIDIA's runtime is the node's default.
            assert gpu not in json.dumps(init["resources"])
            assert sync_env["NVIDIA_VISIBLE_DEVICES"] == "void"
    else:
        assert gpu not in container["resources"].get("limits", {})
        assert flag("--device") == "cpu" and "--gpu-memory-utilization" not in args
        assert "NVIDIA_VISIBLE_DEVICES" not in sync_env
    assert pod_spec.get("runtimeClassName", "") == v["runtimeClassName"]

    # Model sync: an init container from the URI into the cache, credentials only by reference.
    inits = pod_spec.get("initContainers", [])
    if v["model"]["uri"]:
        assert [i["name"] for i in inits] == ["model-sync"]
        sync = inits[0]
        assert sync["args"][:3] == ["sync", v["model"]["uri"], model_dir(v["cache"]["mountPath"], v["model"]["uri"])]
        model_arg = container["args"][container["args"].index("--model") + 1]
        if v["model"]["uri"].startswith("hf://") or "://" not in v["model"]["uri"]:
            # A Hub model: the sync filled the Hub cache, the server finds the snapshot there.
            assert model_arg == v["model"]["uri"]
            assert container["args"][container["args"].index("--download-dir") + 1] == sync["args"][2]
            assert {"name": "HF_HUB_OFFLINE", "value": "1"} in container["env"]
        else:
            assert model_arg == sync["args"][2]
        for env in sync.get("env", []) + container.get("env", []):
            assert "value" not in env or not any(s in env["name"] for s in ("SECRET", "KEY", "TOKEN", "PASSWORD")), env
    else:
        assert not inits and "--model" not in container["args"]
    cache = [vol for vol in pod_spec["volumes"] if vol["name"] == "cache"]
    claims = workload["spec"].get("volumeClaimTemplates", [])
    assert len(cache) + len(claims) == 1, "exactly one cache volume"

    # The API key reaches the server as a file from its Secret, never as a variable.
    assert not any("API_KEY" in e["name"] for e in container.get("env", [])), container.get("env")
    key_volume = [vol for vol in pod_spec["volumes"] if vol["name"] == "api-key"]
    if v["apiKey"]["create"] or v["apiKey"]["existingSecret"]:
        assert container["args"][container["args"].index("--api-key-file") + 1] == "/etc/pagoda/api-key/api-key"
        assert key_volume[0]["secret"]["items"] == [{"key": v["apiKey"]["secretKey"], "path": "api-key"}]
        mount = next(m for m in container["volumeMounts"] if m["name"] == "api-key")
        assert mount == {"name": "api-key", "mountPath": "/etc/pagoda/api-key", "readOnly": True}
    else:
        assert not key_volume and "--api-key-file" not in container["args"]

    # An emptyDir cache is bounded, and a pod that fills it asks the scheduler for the disk.
    if v["cache"]["type"] == "emptyDir" and not claims:
        assert cache[0]["emptyDir"].get("sizeLimit") == v["cache"]["emptyDir"]["sizeLimit"] or not v["cache"]["emptyDir"]["sizeLimit"]
        requested = container["resources"].get("requests", {}).get("ephemeral-storage")
        if v["model"]["uri"] and v["cache"]["emptyDir"]["sizeLimit"]:
            assert requested, "a model cache in an emptyDir requests its ephemeral storage"


def validate_builtin(docs, kube_version):
    for doc in docs:
        if doc["apiVersion"] in ("monitoring.coreos.com/v1", "keda.sh/v1alpha1"):
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']} is invalid for Kubernetes {kube_version}: {e.message}")


def validate_custom(docs):
    custom = [d for d in docs if d["apiVersion"] in ("monitoring.coreos.com/v1", "keda.sh/v1alpha1")]
    if not custom:
        return
    node = shutil.which("node")
    if not node or not (NODE_MODULES / "@kubernetes-models" / "keda").is_dir():
        if os.environ.get("PAGODA_REQUIRE_TOOLS") == "1":
            pytest.fail("the @kubernetes-models validators are not installed (./test.sh installs them)")
        print("custom resources not validated: the @kubernetes-models packages are missing")
        return
    result = subprocess.run(
        [node, str(pathlib.Path(__file__).with_name("validate_crds.mjs")), str(NODE_MODULES)],
        input=json.dumps(custom), capture_output=True, text=True,
    )
    assert result.returncode == 0, f"custom resources invalid: {result.stdout}{result.stderr}"


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_every_values_file_renders_lints_and_validates(renderer, values_file, kube_version):
    values = load_values(values_file)
    docs, notes = renderer.install(values, kube_version=kube_version, api_versions=PROMETHEUS_OPERATOR_API)
    report = lint(str(CHART), values, strict=True, kube_version=f"v{kube_version}", namespace="serving")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report.get("errors", [])
    assert not problems, f"helm lint --strict: {problems}"
    validate_builtin(docs, kube_version)
    validate_custom(docs)
    check_semantics(docs, values, kube_version)
    tests = renderer.hooks(values)
    validate_builtin(tests, kube_version)
    assert "port-forward" in notes and "curl http://127.0.0.1:8000/v1/completions" in notes


def test_feature_files_render_their_feature(renderer):
    def render(name, apis=PROMETHEUS_OPERATOR_API):
        return renderer.install(load_values(name), api_versions=apis)[0]

    assert by_kind(render("ci/statefulset-values.yaml"), "StatefulSet")[0]["spec"]["volumeClaimTemplates"]
    pvc = one(render("ci/pvc-values.yaml"), "PersistentVolumeClaim")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    existing = workload_of(render("ci/existing-claim-values.yaml"))
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "models-cache" for v in existing["spec"]["template"]["spec"]["volumes"])
    one(render("ci/hpa-values.yaml"), "HorizontalPodAutoscaler")
    keda = one(render("ci/keda-values.yaml"), "ScaledObject")
    assert 'vllm:num_requests_waiting{namespace="serving"' in keda["spec"]["triggers"][0]["metadata"]["query"]
    one(render("ci/networkpolicy-values.yaml"), "NetworkPolicy")
    one(render("ci/podmonitor-values.yaml"), "PodMonitor")
    docs = render("ci/servicemonitor-values.yaml")
    assert one(docs, "ServiceMonitor")["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    secret = one(docs, "Secret")
    assert secret["data"]["api-key"], "a generated API key"
    # Without the Prometheus operator's API, no monitor is rendered (it would fail to apply).
    assert not by_kind(render("ci/servicemonitor-values.yaml", apis=()), "ServiceMonitor")
    # Cloud identities: annotations on the ServiceAccount, credentials from a Secret by name.
    sa = one(render("ci/s3-values.yaml"), "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    azure = workload_of(render("ci/azure-values.yaml"))
    assert azure["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    minio = workload_of(render("ci/s3-compatible-values.yaml"))
    sync = minio["spec"]["template"]["spec"]["initContainers"][0]
    assert sync["envFrom"] == [{"secretRef": {"name": "minio-credentials"}}]
    assert ["--endpoint", "http://minio.storage.svc:9000"] == sync["args"][sync["args"].index("--endpoint"):][:2]


def test_a_hub_model_syncs_with_its_token_and_serves_offline(renderer):
    docs, _ = renderer.install(load_values("ci/hf-values.yaml"))
    pod = workload_of(docs)["spec"]["template"]["spec"]
    sync = pod["initContainers"][0]
    assert sync["args"][:3] == ["sync", "meta-llama/Llama-3.1-8B-Instruct", model_dir("/models", "meta-llama/Llama-3.1-8B-Instruct")]
    token = next(e for e in sync["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    server = pod["containers"][0]
    assert not any(e["name"] == "HF_TOKEN" for e in server["env"]), "the server never sees the token"
    args = server["args"]
    assert args[args.index("--model") + 1] == "meta-llama/Llama-3.1-8B-Instruct"
    assert args[args.index("--served-model-name") + 1] == "meta-llama/Llama-3.1-8B-Instruct"
    for uri in ["hf://Qwen/Qwen2.5-0.5B-Instruct@main", "org/name"]:
        renderer.install({"model": {"uri": uri}})
    for bad in ["org/name/extra", "just-a-name"]:
        with pytest.raises(HelmError):
            renderer.install({"model": {"uri": bad}})


def test_the_cpu_file_runs_the_demo_model_without_gpu_or_store(renderer):
    docs, notes = renderer.install(load_values("values-cpu.yaml"))
    pod = workload_of(docs)["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert "tolerations" not in pod
    container = pod["containers"][0]
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert "--model" not in container["args"]
    assert "embedded demo model" in notes


@pytest.mark.parametrize(
    "values, message",
    [
        ({"gpuu": {"enabled": False}}, "gpuu"),
        ({"server": {"port": "eighty"}}, "port"),
        ({"cache": {"pvc": {"size": "16 Gi"}}}, "size"),
        ({"model": {"uri": "ftp://models/x"}}, "uri"),
        ({"workload": {"kind": "DaemonSet"}}, "kind"),
    ],
)
def test_the_values_schema_rejects_typos_and_wrong_types(renderer, values, message):
    with pytest.raises(HelmError) as err:
        renderer.install(values)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"workload": {"replicas": 2}, "model": {"uri": "s3://a/b"}, "cache": {"type": "pvc"}},
            "a ReadWriteOnce claim cannot be shared by up to 2 replicas",
        ),
        (
            {"autoscaling": {"hpa": {"enabled": True, "maxReplicas": 3}}, "cache": {"type": "existingClaim", "existingClaim": {"name": "c"}}},
            "a ReadWriteOnce claim cannot be shared by up to 3 replicas",
        ),
        ({"autoscaling": {"hpa": {"enabled": True}, "keda": {"enabled": True}}}, "enable the HPA or KEDA, not both"),
        ({"cache": {"type": "existingClaim"}}, "cache.existingClaim.name is required"),
        ({"metrics": {"podMonitor": {"enabled": True}}}, "enable the ServiceMonitor or the PodMonitor, not both"),
    ],
)
def test_impossible_combinations_fail_at_render_time(renderer, values, message):
    with pytest.raises(HelmError) as err:
        renderer.install(values)
    assert message in str(err.value)


def test_quantities_are_accepted_as_strings_and_numbers(renderer):
    values = {"shm": {"sizeLimit": "512Mi"}, "server": {"resources": {"requests": {"cpu": 2, "memory": "8Gi"}}}, "gpu": {"enabled": False}}
    docs, _ = renderer.install(values)
    container = workload_of(docs)["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"] == {"cpu": 2, "memory": "8Gi"}


def test_long_release_names_stay_within_limits(renderer):
    name = "a-very-long-release-name-that-goes-on-and-on-and-on-beyond-reason"[:53]
    docs, _ = renderer.install(load_values("ci/statefulset-values.yaml"), name=name)
    for doc in docs:
        assert len(doc["metadata"]["name"]) <= 63
    for pod in renderer.hooks({}, name=name):
        assert len(pod["metadata"]["name"]) <= 63


def test_helm_tests_check_health_and_a_completion(renderer):
    pods = renderer.hooks({"apiKey": {"create": True}})
    assert {p["metadata"]["annotations"]["helm.sh/hook"] for p in pods} == {"test"}
    health = next(p for p in pods if p["metadata"]["name"].endswith("-test-health"))
    assert health["spec"]["containers"][0]["args"][-1] == "http://rel-pagoda:8000/health"
    completion = next(p for p in pods if p["metadata"]["name"].endswith("-test-completion"))
    script = completion["spec"]["containers"][0]["args"][0]
    assert "/v1/completions" in script and "Authorization: Bearer $API_KEY" in script
    assert completion["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "rel-pagoda-api-key"


def test_the_dashboard_is_the_shipped_file_and_uses_real_metrics(renderer):
    docs, _ = renderer.install({})
    config_map = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard"))
    shipped = (CHART / "files" / "grafana" / "pagoda.json").read_text()
    assert json.loads(config_map["data"]["pagoda.json"]) == json.loads(shipped)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    exported = {
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
        "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
        "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket", "vllm:request_queue_time_seconds_bucket",
        "pagoda_build_info", "pagoda_cloud_info",
        # src/telemetry/gpu.rs, from NVML
        "pagoda_gpu_utilization_ratio", "pagoda_gpu_memory_used_bytes", "pagoda_gpu_memory_total_bytes",
        "pagoda_gpu_temperature_celsius", "pagoda_gpu_power_draw_watts", "pagoda_gpu_power_limit_watts",
        "pagoda_gpu_sm_clock_hertz", "pagoda_gpu_info", "pagoda_gpu_throttle_reason",
    }
    import re
    used = set(re.findall(r"(vllm:[a-z0-9_]+|pagoda_[a-z0-9_]+)", shipped))
    assert used <= exported, f"the dashboard queries metrics Pagoda does not export: {used - exported}"
    gpu_source = (ROOT / "src" / "telemetry" / "gpu.rs").read_text()
    assert {m for m in exported if m.startswith("pagoda_gpu_")} <= set(re.findall(r"pagoda_gpu_[a-z_]+", gpu_source))
    assert {m for m in used if m.startswith("pagoda_gpu_")}, "the dashboard shows the GPUs"


def test_every_value_has_a_comment():
    """Each key is documented by a comment right above it, or sits inside a documented value (the
    keys of a Kubernetes object given as a value, such as `resources`)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    documented = []  # (indent, documented) of the keys enclosing the current line
    for idx, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- ") or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        while documented and documented[-1][0] >= indent:
            documented.pop()
        has_comment = lines[idx - 1].strip().startswith("#")
        inherited = any(d for _, d in documented)
        key, _, rest = stripped.partition(":")
        is_parent = rest.strip() == "" and idx + 1 < len(lines) and (
            len(lines[idx + 1]) - len(lines[idx + 1].lstrip()) > indent
        )
        assert has_comment or inherited or is_parent, f"values.yaml line {idx + 1}: '{key}' has no comment"
        documented.append((indent, has_comment or inherited))


def test_the_network_policy_admits_prometheus_whenever_a_monitor_is_on(renderer):
    """The monitors scrape the server port; a policy that dropped them would leave the dashboards
    and the autoscalers without data."""
    prometheus = merged({})["networkPolicy"]["monitoring"]["from"]
    assert prometheus[0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    for monitors in [{}, {"serviceMonitor": {"enabled": False}, "podMonitor": {"enabled": True}}]:
        values = {**load_values("ci/networkpolicy-values.yaml"), "metrics": monitors}
        rules = one(renderer.install(values, api_versions=PROMETHEUS_OPERATOR_API)[0], "NetworkPolicy")["spec"]["ingress"]
        assert len(rules) == 2 and rules[1]["from"] == prometheus, rules
        assert rules[1]["ports"] == [{"port": "http", "protocol": "TCP"}]
    # No monitor, or no monitoring peers: only the configured peers.
    off = {**load_values("ci/networkpolicy-values.yaml"), "metrics": {"serviceMonitor": {"enabled": False}}}
    assert len(one(renderer.install(off)[0], "NetworkPolicy")["spec"]["ingress"]) == 1
    none = {**load_values("ci/networkpolicy-values.yaml"), "networkPolicy": {"enabled": True, "monitoring": {"from": []}}}
    assert len(one(renderer.install(none)[0], "NetworkPolicy")["spec"]["ingress"]) == 1


def test_keda_scales_to_zero_only_on_a_metric_that_exists_without_pods(renderer):
    zero = {"autoscaling": {"keda": {"enabled": True, "minReplicas": 0}}}
    with pytest.raises(HelmError) as err:
        renderer.install(zero)
    assert "minReplicas 0 could never scale back up" in str(err.value)
    gateway = 'sum(rate(envoy_cluster_upstream_rq_total{envoy_cluster_name="pagoda"}[1m]))'
    zero["autoscaling"]["keda"]["query"] = gateway
    scaled = one(renderer.install(zero)[0], "ScaledObject")
    assert scaled["spec"]["minReplicaCount"] == 0
    assert scaled["spec"]["triggers"][0]["metadata"]["query"] == gateway


def test_rollouts_take_the_gpus_old_pods_give_back_unless_told_otherwise(renderer):
    default = workload_of(renderer.install({})[0])["spec"]["strategy"]
    assert default == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    recreate = workload_of(renderer.install({"deploymentStrategy": {"type": "Recreate"}})[0])["spec"]["strategy"]
    assert recreate == {"type": "Recreate"}
    surge = workload_of(renderer.install(load_values("ci/extras-values.yaml"))[0])["spec"]["strategy"]
    assert surge["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    with pytest.raises(HelmError) as err:
        renderer.install({**load_values("ci/statefulset-values.yaml"), "deploymentStrategy": {"type": "Recreate"}})
    assert "deploymentStrategy applies to a Deployment" in str(err.value)


def test_an_emptydir_cache_is_bounded_and_its_disk_requested(renderer):
    def pod(values):
        return workload_of(renderer.install(values)[0])["spec"]["template"]["spec"]

    def cache_and_request(values):
        spec = pod(values)
        cache = next(vol for vol in spec["volumes"] if vol["name"] == "cache")["emptyDir"]
        return cache.get("sizeLimit"), spec["containers"][0]["resources"].get("requests", {}).get("ephemeral-storage")

    model = {"model": {"uri": "s3://models/llama"}}
    assert cache_and_request(model) == ("64Gi", "64Gi")
    assert cache_and_request({**model, "cache": {"emptyDir": {"sizeLimit": "200Gi"}}}) == ("200Gi", "200Gi")
    # The demo model downloads nothing: bounded, but nothing requested for it.
    assert cache_and_request({}) == ("64Gi", None)
    # The user's own request wins; an empty limit means neither.
    own = {**model, "server": {"resources": {"requests": {"cpu": "4", "ephemeral-storage": "10Gi"}}}}
    assert cache_and_request(own) == ("64Gi", "10Gi")
    # A limit of their own below the cache would make the request exceed it: nothing is added.
    limited = {**model, "server": {"resources": {"limits": {"memory": "32Gi", "ephemeral-storage": "20Gi"}}}}
    assert cache_and_request(limited) == ("64Gi", None)
    assert cache_and_request({**model, "cache": {"emptyDir": {"sizeLimit": ""}}}) == (None, None)


def test_images_are_pinned_by_digest_and_digests_stay_out_of_tags(renderer):
    digest = "sha256:" + "0123456789abcdef" * 4
    spec = workload_of(renderer.install({"image": {"repository": "r.example/pagoda", "tag": "1.0", "digest": digest}, "model": {"uri": "s3://a/b"}})[0])["spec"]["template"]["spec"]
    assert spec["containers"][0]["image"] == f"r.example/pagoda@{digest}"
    assert spec["initContainers"][0]["image"] == f"r.example/pagoda@{digest}"
    renderer.install({"image": {"tag": "a" * 128}})  # the longest tag OCI allows
    for image, message in [
        ({"tag": "a" * 129}, "tag"),
        ({"tag": f"1.0@{digest}"}, "tag"),
        ({"tag": digest}, "tag"),
        ({"digest": digest[:-1]}, "digest"),
        ({"digest": "sha256:" + "A" * 64}, "digest"),
    ]:
        with pytest.raises(HelmError) as err:
            renderer.install({"image": image})
        assert message in str(err.value), image


def test_what_users_bring_lands_where_it_belongs(renderer):
    values = load_values("ci/extras-values.yaml")
    spec = workload_of(renderer.install(values)[0])["spec"]["template"]["spec"]
    server, shipper = spec["containers"]
    assert server["name"] == "pagoda" and shipper == values["extraContainers"][0]
    assert {"name": "RUST_LOG", "value": "info"} in server["env"]
    assert server["envFrom"] == values["envFrom"]
    assert values["extraVolumes"][0] in spec["volumes"]
    assert values["extraVolumeMounts"][0] in server["volumeMounts"]
    key = next(vol for vol in spec["volumes"] if vol["name"] == "api-key")["secret"]
    assert key == {"secretName": "pagoda-api-key", "items": [{"key": "key", "path": "api-key"}], "defaultMode": 0o440}
    # The old place for the server's variables is gone, so it fails loudly instead of being ignored.
    with pytest.raises(HelmError) as err:
        renderer.install({"server": {"env": [{"name": "A", "value": "b"}]}})
    assert "env" in str(err.value)


def test_each_model_uri_syncs_into_its_own_cache_folder(renderer):
    """Switching a release to another model (or Hub revision) syncs beside the files the running
    replicas have mapped, never over them."""
    def dirs(uri):
        pod = workload_of(renderer.install({"model": {"uri": uri}, "cache": {"type": "pvc", "pvc": {"accessModes": ["ReadWriteMany"]}}})[0])["spec"]["template"]["spec"]
        server_args = pod["containers"][0]["args"]
        flag = "--download-dir" if "--download-dir" in server_args else "--model"
        return pod["initContainers"][0]["args"][2], server_args[server_args.index(flag) + 1]

    seen = set()
    for uri in ["s3://models/llama-3.1-8b", "s3://models/llama-3.1-70b", "hf://Qwen/Qwen2.5-0.5B-Instruct@main", "hf://Qwen/Qwen2.5-0.5B-Instruct@v2"]:
        synced, served = dirs(uri)
        assert synced == served == model_dir("/models", uri), uri
        assert synced.startswith("/models/models/") and synced not in seen, uri
        seen.add(synced)
    assert dirs("s3://models/llama-3.1-8b")[0] == model_dir("/models", "s3://models/llama-3.1-8b"), "stable across renders"


def test_gpu_pods_take_their_memory_share_and_runtime_class_from_values(renderer):
    docs, _ = renderer.install(load_values("ci/gpu-values.yaml"))
    spec = workload_of(docs)["spec"]["template"]["spec"]
    assert spec["runtimeClassName"] == "nvidia"
    args = spec["containers"][0]["args"]
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.95"
    # The limits of the share: (0, 1].
    renderer.install({"gpu": {"memoryUtilization": 1}})
    renderer.install({"gpu": {"memoryUtilization": 0.01}})
    for bad in [0, 1.01, -0.5]:
        with pytest.raises(HelmError) as err:
            renderer.install({"gpu": {"memoryUtilization": bad}})
        assert "memoryUtilization" in str(err.value), bad
    # One GPU per pod until the server has tensor parallelism: more is refused at render time,
    # not after a pod has downloaded the model.
    with pytest.raises(HelmError) as err:
        renderer.install({"gpu": {"count": 2}})
    assert "gpu.count: the server serves a model on one GPU" in str(err.value)
    renderer.install({"gpu": {"enabled": False, "count": 2}})  # no GPUs requested: nothing to refuse
    # The CPU file serves on the CPU, with no GPU flag and no runtime class.
    cpu = workload_of(renderer.install(load_values("values-cpu.yaml"))[0])["spec"]["template"]["spec"]
    cpu_args = cpu["containers"][0]["args"]
    assert cpu_args[cpu_args.index("--device") + 1] == "cpu" and "runtimeClassName" not in cpu


def test_a_cache_of_its_own_drops_the_models_it_no_longer_serves(renderer):
    """The sync removes other model folders only where no other pod reads the cache."""
    def removes(values):
        values = {**values, "model": {"uri": "s3://models/llama"}}
        pod = workload_of(renderer.install(values)[0])["spec"]["template"]["spec"]
        return "--remove-other-models" in pod["initContainers"][0]["args"]

    rwx = {"pvc": {"accessModes": ["ReadWriteMany"]}}
    assert removes({})  # an emptyDir
    assert removes({"cache": {"type": "pvc"}})  # ReadWriteOnce: one replica
    assert removes({"workload": {"kind": "StatefulSet"}, "cache": {"type": "pvc", **rwx}})  # a claim per replica
    assert removes({"cache": {"type": "existingClaim", "existingClaim": {"name": "c"}}})
    assert not removes({"cache": {"type": "pvc", **rwx}})
    assert not removes({"cache": {"type": "existingClaim", "existingClaim": {"name": "c", "accessMode": "ReadWriteMany"}}})


def test_a_store_model_syncs_as_versions_that_running_replicas_keep(renderer):
    """A changed model never rewrites the files running replicas have mapped: the sync is
    versioned and the server is given the folder whose `current` version it loads and holds; on a
    shared cache, other models go only when no server holds them."""
    def sync_and_serve(values, uri="s3://models/llama"):
        values = {**values, "model": {"uri": uri}}
        pod = workload_of(renderer.install(values)[0])["spec"]["template"]["spec"]
        sync_args, serve_args = pod["initContainers"][0]["args"], pod["containers"][0]["args"]
        return sync_args, serve_args

    rwx = {"cache": {"type": "pvc", "pvc": {"accessModes": ["ReadWriteMany"]}}}
    for values in ({}, rwx):
        sync_args, serve_args = sync_and_serve(values)
        assert "--versioned" in sync_args
        # The folder the sync keeps versions in is the one the server is given.
        assert serve_args[serve_args.index("--model") + 1] == sync_args[2]
    assert "--remove-unused-models" in sync_and_serve(rwx)[0]
    assert "--remove-unused-models" not in sync_and_serve({})[0]
    # A Hub cache keeps each revision in a snapshot of its own: no versions, nothing removed.
    for values in ({}, rwx):
        sync_args, _ = sync_and_serve(values, uri="hf://Qwen/Qwen2.5-0.5B-Instruct")
        assert "--versioned" not in sync_args and "--remove-unused-models" not in sync_args
