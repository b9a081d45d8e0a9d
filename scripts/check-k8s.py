"""What kubernetes-validate's schemas cannot say about k8s/: every pod runs as non-root with a
read-only root file system (temporary files in an emptyDir named by TMPDIR), has CPU and memory
requests and limits, each service answers gRPC startup, readiness and liveness probes on its gRPC
port, pods that may overlap on one store (RollingUpdate, replicas > 1) keep their job leases (no
DISTILL_SINGLE_REPLICA), every command a container (sidecars included) or its exec probes run is a
program its image installs (read from the Dockerfile's COPY into a PATH dir), and an Indexed Job's
pods label the parts its completions count (`--partition $(JOB_COMPLETION_INDEX)/N`, N the
completions, all running at once).

Usage: check-k8s.py k8s/*.yaml   (exit 1 naming each problem)
"""
import re
import sys

import yaml

IMAGES = {"distill:latest": "docker/Dockerfile", "distill:cuda": "docker/Dockerfile.cuda"}


def programs(dockerfile):
    """Programs the Dockerfile's last stage copies onto the PATH, and its ENTRYPOINT."""
    text = open(dockerfile).read().replace("\\\n", " ")
    stage = re.split(r"(?m)^FROM ", text)[-1]
    found, entry = set(), None
    for line in stage.splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and words[-1].rstrip("/") in ("/usr/local/bin", "/usr/bin", "/bin"):
            found |= {w.rsplit("/", 1)[-1] for w in words[1:-1] if not w.startswith("--")}
        if words[:1] == ["ENTRYPOINT"]:
            entry = yaml.safe_load(line[len("ENTRYPOINT"):])[0]
    return found, entry


def check_container(where, c, pod, problems):
    sc = c.get("securityContext", {})
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{where}: readOnlyRootFilesystem is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation is not false")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        problems.append(f"{where}: capabilities do not drop ALL")
    res = c.get("resources", {})
    for kind, keys in (("requests", ("cpu", "memory")), ("limits", ("cpu", "memory"))):
        for k in keys:
            if k not in res.get(kind, {}):
                problems.append(f"{where}: no {kind}.{k}")
    image = c.get("image")
    if image not in IMAGES:
        problems.append(f"{where}: image {image} is not one the repository builds ({list(IMAGES)})")
        return
    installed, entry = programs(IMAGES[image])
    programs_run = [(c.get("command") or [entry])[0]]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        programs_run += c.get(probe, {}).get("exec", {}).get("command", [])[:1]
    for program in programs_run:
        if program not in installed:
            problems.append(f"{where}: runs {program}, which {IMAGES[image]} does not install ({sorted(installed)})")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    for path, name in mounts.items():
        if name not in volumes:
            problems.append(f"{where}: mounts {name}, which the pod does not declare")
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    if "TMPDIR" in env and mounts.get(env["TMPDIR"]) not in {n for n, v in volumes.items() if "emptyDir" in v}:
        problems.append(f"{where}: TMPDIR {env['TMPDIR']} is not an emptyDir mount")


def check_probes(where, c, problems):
    grpc = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == "grpc"]
    if not grpc:
        problems.append(f"{where}: no port named grpc")
        return
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        port = c.get(probe, {}).get("grpc", {}).get("port")
        if port != grpc[0]:
            problems.append(f"{where}: {probe} is not a gRPC probe on port {grpc[0]}")
    if "TMPDIR" not in {e["name"] for e in c.get("env", [])}:
        problems.append(f"{where}: no TMPDIR (the root file system is read-only)")


def check(doc, problems):
    kind, name = doc["kind"], doc["metadata"]["name"]
    if kind not in ("Deployment", "Job"):
        return
    pod = doc["spec"]["template"]["spec"]
    psc = pod.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True or not psc.get("runAsUser"):
        problems.append(f"{kind}/{name}: pod does not run as a non-root user")
    if kind == "Deployment":
        shared = doc["spec"].get("strategy", {}).get("type") != "Recreate" or doc["spec"].get("replicas", 1) != 1
        single = any(e["name"] == "DISTILL_SINGLE_REPLICA" for c in pod["containers"] for e in c.get("env", []))
        if shared and single:
            problems.append(f"{kind}/{name}: pods share its store but run without leases (DISTILL_SINGLE_REPLICA)")
    for c in pod["containers"] + pod.get("initContainers", []):
        where = f"{kind}/{name} container {c['name']}"
        check_container(where, c, pod, problems)
        if kind == "Deployment":
            check_probes(where, c, problems)
    if doc["spec"].get("completionMode") == "Indexed":
        check_parts(f"{kind}/{name}", doc["spec"], pod, problems)


def check_parts(where, spec, pod, problems):
    """An Indexed Job labels part $(JOB_COMPLETION_INDEX) of N in each pod, N its completions."""
    n = spec.get("completions")
    if spec.get("parallelism") != n:
        problems.append(f"{where}: parallelism {spec.get('parallelism')} differs from completions {n}")
    for c in pod["containers"]:
        args = c.get("args", [])
        if "label" not in args:
            continue
        parts = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--partition"]
        if parts != [f"$(JOB_COMPLETION_INDEX)/{n}"]:
            problems.append(f"{where}: container {c['name']} labels {parts}, not $(JOB_COMPLETION_INDEX)/{n}")


def main():
    problems = []
    for path in sys.argv[1:]:
        for doc in yaml.safe_load_all(open(path)):
            if doc:
                check(doc, problems)
    for p in problems:
        print(f"k8s: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"k8s: {len(sys.argv) - 1} files meet the pod policy")


if __name__ == "__main__":
    main()
