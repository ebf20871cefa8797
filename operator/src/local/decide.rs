//! The pure decisions of local mode, kept apart from process and network I/O so they can be
//! tested on their own: which worker slots to start or stop for a replica count, and what an
//! edit of the pipeline file calls for.

use std::collections::BTreeSet;

use signal_model::manifest::PipelineManifest;

/// Worker slots to start and to stop to reach a replica count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScalePlan {
    pub start: Vec<usize>,
    pub stop: Vec<usize>,
}

/// Slots `0..desired` should run, and nothing else.
///
/// A slot is a worker's identity: it fixes the worker's metrics port (`base + slot`), so the
/// lowest free slots are filled first and the highest ones are stopped first, keeping the ports
/// of the workers that stay.
pub fn plan_scaling(desired: usize, running: &BTreeSet<usize>) -> ScalePlan {
    ScalePlan {
        start: (0..desired)
            .filter(|slot| !running.contains(slot))
            .collect(),
        stop: running
            .iter()
            .copied()
            .filter(|slot| *slot >= desired)
            .rev()
            .collect(),
    }
}

/// The number of worker processes a manifest asks for.
pub fn desired_replicas(manifest: &PipelineManifest) -> usize {
    // Validation rejects negative counts; treat one that slipped through as zero.
    usize::try_from(manifest.spec.workers.replicas).unwrap_or(0)
}

/// What an edit of the pipeline file calls for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reaction {
    /// The stream, consumer or table settings changed (or the pipeline's name, which names the
    /// durable consumer): reconcile the data plane again.
    pub reconcile_data_plane: bool,
    /// Something the running workers read at start changed: replace them.
    pub restart_workers: bool,
    /// The replica count changed: start or stop workers.
    pub rescale: bool,
}

impl Reaction {
    /// Nothing that matters changed (e.g. a comment was edited).
    pub fn is_nothing(&self) -> bool {
        *self == Reaction::default()
    }
}

/// Compares the running manifest with an edited, valid one.
///
/// Workers read everything in the manifest except the replica count, so any other difference
/// restarts them; a replica change alone only starts or stops processes.
pub fn react_to_edit(running: &PipelineManifest, edited: &PipelineManifest) -> Reaction {
    let data_plane = |m: &PipelineManifest| {
        (
            m.metadata.name.clone(),
            m.spec.nats.clone(),
            m.spec.stream.clone(),
            m.spec.consumer.clone(),
            m.spec.clickhouse.clone(),
        )
    };
    let without_replicas = |m: &PipelineManifest| {
        let mut copy = m.clone();
        copy.spec.workers.replicas = 0;
        copy
    };
    Reaction {
        reconcile_data_plane: data_plane(running) != data_plane(edited),
        restart_workers: without_replicas(running) != without_replicas(edited),
        rescale: running.spec.workers.replicas != edited.spec.workers.replicas,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(slots: &[usize]) -> BTreeSet<usize> {
        slots.iter().copied().collect()
    }

    #[test]
    fn scaling_fills_the_lowest_slots_and_stops_the_highest() {
        assert_eq!(
            plan_scaling(3, &set(&[])),
            ScalePlan {
                start: vec![0, 1, 2],
                stop: vec![]
            }
        );
        assert_eq!(
            plan_scaling(1, &set(&[0, 1, 2])),
            ScalePlan {
                start: vec![],
                stop: vec![2, 1]
            }
        );
        // A gap left by a worker waiting for its restart is not refilled twice.
        assert_eq!(
            plan_scaling(3, &set(&[0, 2])),
            ScalePlan {
                start: vec![1],
                stop: vec![]
            }
        );
        assert_eq!(plan_scaling(2, &set(&[0, 1])), ScalePlan::default());
        assert_eq!(
            plan_scaling(0, &set(&[0, 1])),
            ScalePlan {
                start: vec![],
                stop: vec![1, 0]
            }
        );
    }

    const MANIFEST: &str = r#"
apiVersion: signals.dev/v1alpha1
kind: SignalPipeline
metadata: {name: tx}
spec:
  nats: {url: "nats://127.0.0.1:4222"}
  stream: {name: SIGNALS, subjects: ["signals.>"], maxAge: 1d}
  clickhouse:
    url: http://127.0.0.1:8123
    database: db
    table: t
    columns: [{name: id, type: UInt64, from: "@sequence"}]
  workers: {replicas: 1, batch: {maxRows: 1000}}
"#;

    fn edited(from: &str, to: &str) -> Reaction {
        let running = PipelineManifest::from_yaml(MANIFEST).unwrap();
        let edited = PipelineManifest::from_yaml(&MANIFEST.replace(from, to)).unwrap();
        react_to_edit(&running, &edited)
    }

    #[test]
    fn a_replica_change_only_rescales() {
        let reaction = edited("replicas: 1", "replicas: 3");
        assert_eq!(
            reaction,
            Reaction {
                rescale: true,
                ..Reaction::default()
            }
        );
        assert_eq!(
            desired_replicas(&PipelineManifest::from_yaml(MANIFEST).unwrap()),
            1
        );
    }

    #[test]
    fn worker_settings_restart_workers_without_touching_the_data_plane() {
        let reaction = edited("maxRows: 1000", "maxRows: 2000");
        assert!(reaction.restart_workers && !reaction.reconcile_data_plane && !reaction.rescale);
    }

    #[test]
    fn data_plane_settings_reconcile_and_restart() {
        for (from, to) in [
            ("maxAge: 1d", "maxAge: 2d"),
            ("table: t", "table: t2"),
            ("name: tx", "name: tx2"),
            ("nats://127.0.0.1:4222", "nats://127.0.0.1:4223"),
        ] {
            let reaction = edited(from, to);
            assert!(
                reaction.reconcile_data_plane && reaction.restart_workers,
                "{from} -> {to}: {reaction:?}"
            );
        }
    }

    #[test]
    fn formatting_and_comments_change_nothing() {
        assert!(edited("workers:", "# a comment\n  workers:").is_nothing());
    }
}
