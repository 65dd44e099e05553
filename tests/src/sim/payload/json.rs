//! The kubelet's JSON documents: `/pods` and `/runningpods/` (PodLists) and `/stats/summary`,
//! shaped like kubelet 1.35 captures.

use super::super::world::{Qos, Rng, SimPod, World, rfc3339};
use serde_json::{Value, json};

/// `/pods`: full Pod objects as the kubelet holds them (with `managedFields` and the
/// kubelet's `config.seen` annotation).
pub fn pods(world: &World) -> Value {
    let items: Vec<Value> = world.pods.iter().map(|p| pod(world, p)).collect();
    json!({ "kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items })
}

fn pod(world: &World, p: &SimPod) -> Value {
    let created = rfc3339(p.start_time - 2);
    let started = rfc3339(p.start_time);
    let rs_hash = p
        .name
        .strip_prefix(&format!("{}-", p.app))
        .and_then(|s| s.split('-').next())
        .unwrap_or("0");
    let rs_name = format!("{}-{rs_hash}", p.app);
    let mut rng = Rng::new(p.start_time as u64);
    let resources = match p.qos {
        Qos::Guaranteed => {
            json!({"limits": {"cpu": "500m", "memory": "256Mi"}, "requests": {"cpu": "500m", "memory": "256Mi"}})
        }
        Qos::Burstable => {
            json!({"limits": {"memory": "512Mi"}, "requests": {"cpu": "100m", "memory": "128Mi"}})
        }
        Qos::BestEffort => json!({}),
    };
    let token_volume = format!("kube-api-access-{}", rng.suffix(5));
    let containers: Vec<Value> = p
        .containers
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "image": c.image,
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "resources": resources,
                "volumeMounts": [{"name": token_volume, "readOnly": true,
                                  "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"},
                                  "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1,
                                  "failureThreshold": 3},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent"
            })
        })
        .collect();
    let statuses: Vec<Value> = p
        .containers
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "state": {"running": {"startedAt": rfc3339(p.start_time + 3)}},
                "lastState": {},
                "ready": true,
                "restartCount": c.restart_count,
                "image": c.image,
                "imageID": format!("{}@sha256:{}", c.image.split(':').next().unwrap_or(&c.image), &c.id),
                "containerID": format!("containerd://{}", c.id),
                "started": true,
                "volumeMounts": [{"name": token_volume,
                                  "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                                  "readOnly": true, "recursiveReadOnly": "Disabled"}]
            })
        })
        .collect();
    let condition = |t: &str, at: &str| {
        json!({"type": t, "observedGeneration": 1, "status": "True", "lastProbeTime": null,
               "lastTransitionTime": at})
    };
    json!({
        "metadata": {
            "name": p.name,
            "generateName": format!("{rs_name}-"),
            "namespace": p.namespace,
            "uid": p.uid,
            "resourceVersion": (1000 + rng.below(900_000)).to_string(),
            "generation": 1,
            "creationTimestamp": created,
            "labels": {"app": p.app, "pod-template-hash": rs_hash},
            "annotations": {
                "kubernetes.io/config.seen": format!("{}.000000000Z", created.trim_end_matches('Z')),
                "kubernetes.io/config.source": "api"
            },
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs_name,
                                 "uid": rng.uuid(), "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update",
                               "apiVersion": "v1", "time": created, "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}}}}}]
        },
        "spec": {
            "volumes": [{"name": token_volume, "projected": {"sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
            ], "defaultMode": 420}}],
            "containers": containers,
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "serviceAccount": "default",
            "nodeName": world.node_name,
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            ],
            "priority": 0,
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": {
            "observedGeneration": 1,
            "phase": "Running",
            "conditions": [
                condition("PodReadyToStartContainers", &started),
                condition("Initialized", &started),
                condition("Ready", &rfc3339(p.start_time + 5)),
                condition("ContainersReady", &rfc3339(p.start_time + 5)),
                condition("PodScheduled", &created)
            ],
            "hostIP": world.node_ip,
            "hostIPs": [{"ip": world.node_ip}],
            "podIP": p.ip,
            "podIPs": [{"ip": p.ip}],
            "startTime": started,
            "containerStatuses": statuses,
            "qosClass": p.qos.as_str()
        }
    })
}

/// `/runningpods/`: what the container runtime reports, as the kubelet renders it (bare pods:
/// name, namespace, uid, and the containers' names, images and ids).
pub fn running_pods(world: &World) -> Value {
    let items: Vec<Value> = world
        .pods
        .iter()
        .map(|p| {
            let containers: Vec<Value> = p
                .containers
                .iter()
                .map(|c| json!({"name": c.name, "image": c.image, "resources": {}}))
                .collect();
            json!({
                "metadata": {"name": p.name, "namespace": p.namespace, "uid": p.uid,
                             "creationTimestamp": null},
                "spec": {"containers": containers},
                "status": {}
            })
        })
        .collect();
    json!({ "kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items })
}

fn psi(rng: &mut Rng) -> Value {
    json!({
        "full": {"total": rng.below(1_000_000), "avg10": 0, "avg60": 0, "avg300": 0},
        "some": {"total": rng.below(1_000_000), "avg10": 0, "avg60": 0.01, "avg300": 0}
    })
}

fn cpu(rng: &mut Rng, time: &str, magnitude: u64) -> Value {
    json!({"time": time, "usageNanoCores": rng.below(magnitude * 10_000_000),
           "usageCoreNanoSeconds": rng.below(magnitude * 1_000_000_000_000), "psi": psi(rng)})
}

fn memory(rng: &mut Rng, time: &str, magnitude: u64, node: bool) -> Value {
    let usage = magnitude * 50_000_000 + rng.below(magnitude * 50_000_000);
    let mut m = json!({"time": time, "usageBytes": usage, "workingSetBytes": usage * 3 / 4,
                       "rssBytes": usage / 2, "pageFaults": rng.below(1_000_000),
                       "majorPageFaults": rng.below(10), "psi": psi(rng)});
    if node {
        m["availableBytes"] = json!(8_000_000_000u64 - usage.min(7_000_000_000));
    }
    m
}

fn fs(rng: &mut Rng, time: &str, used: u64) -> Value {
    json!({"time": time, "availableBytes": 821_203_210_240u64, "capacityBytes": 977_896_124_416u64,
           "usedBytes": used + rng.below(used.max(1)), "inodesFree": 59_206_606,
           "inodes": 60_710_912, "inodesUsed": 23 + rng.below(1000)})
}

fn network(rng: &mut Rng, time: &str) -> Value {
    let rx = rng.below(1_000_000_000);
    let tx = rng.below(100_000_000);
    json!({"time": time, "name": "eth0", "rxBytes": rx, "rxErrors": 0, "txBytes": tx, "txErrors": 0,
           "interfaces": [{"name": "eth0", "rxBytes": rx, "rxErrors": 0, "txBytes": tx, "txErrors": 0}]})
}

/// `/stats/summary`. With `cpu_and_memory_only` (the `only_cpu_and_memory=true` query the
/// metrics-server sends), only the CPU and memory sections, as the kubelet does.
pub fn stats_summary(world: &World, cpu_and_memory_only: bool) -> Value {
    let mut rng = Rng::new(0x5747_4154);
    let now = rfc3339(world.now_ms / 1000 - 5);
    let boot = rfc3339(world.boot_time);
    let system: Vec<Value> = ["kubelet", "runtime", "pods"]
        .iter()
        .map(|name| {
            let mut c = json!({"name": name, "startTime": boot,
                               "cpu": cpu(&mut rng, &now, 2), "memory": memory(&mut rng, &now, 2, false)});
            if !cpu_and_memory_only {
                c["io"] = json!({"time": now, "psi": psi(&mut rng)});
                c["swap"] = json!({"time": now, "swapUsageBytes": 0});
            }
            c
        })
        .collect();
    let mut node = json!({
        "nodeName": world.node_name,
        "systemContainers": system,
        "startTime": boot,
        "cpu": cpu(&mut rng, &now, 8),
        "memory": memory(&mut rng, &now, 30, true),
    });
    if !cpu_and_memory_only {
        node["io"] = json!({"time": now, "psi": psi(&mut rng)});
        node["network"] = network(&mut rng, &now);
        node["fs"] = fs(&mut rng, &now, 100_000_000_000);
        node["runtime"] = json!({"imageFs": fs(&mut rng, &now, 1_700_000_000),
                                 "containerFs": fs(&mut rng, &now, 1_700_000_000)});
        node["rlimit"] = json!({"time": now, "maxpid": 62_639, "curproc": 814});
        node["swap"] = json!({"time": now, "swapAvailableBytes": 0, "swapUsageBytes": 0});
    }
    let pods: Vec<Value> = world
        .pods
        .iter()
        .map(|p| {
            let start = rfc3339(p.start_time);
            let containers: Vec<Value> = p
                .containers
                .iter()
                .map(|c| {
                    let mut v = json!({"name": c.name, "startTime": rfc3339(p.start_time + 3),
                                       "cpu": cpu(&mut rng, &now, 1), "memory": memory(&mut rng, &now, 1, false)});
                    if !cpu_and_memory_only {
                        v["io"] = json!({"time": now, "psi": psi(&mut rng)});
                        v["rootfs"] = fs(&mut rng, &now, 86_016);
                        v["logs"] = fs(&mut rng, &now, 32_768);
                        v["swap"] = json!({"time": now, "swapAvailableBytes": 0, "swapUsageBytes": 0});
                    }
                    v
                })
                .collect();
            let mut v = json!({
                "podRef": {"name": p.name, "namespace": p.namespace, "uid": p.uid},
                "startTime": start,
                "containers": containers,
                "cpu": cpu(&mut rng, &now, 1),
                "memory": memory(&mut rng, &now, 1, false),
            });
            if !cpu_and_memory_only {
                v["io"] = json!({"time": now, "psi": psi(&mut rng)});
                v["network"] = network(&mut rng, &now);
                v["volume"] = json!([{"time": now, "availableBytes": 8_000_000_000u64,
                                      "capacityBytes": 8_000_000_000u64, "usedBytes": 12_288,
                                      "inodesFree": 1_000_000, "inodes": 1_000_009, "inodesUsed": 9,
                                      "name": "kube-api-access"}]);
                v["ephemeral-storage"] = fs(&mut rng, &now, 131_072);
                v["process_stats"] = json!({"process_count": 1 + rng.below(20)});
                v["swap"] = json!({"time": now, "swapUsageBytes": 0});
            }
            v
        })
        .collect();
    json!({ "node": node, "pods": pods })
}
