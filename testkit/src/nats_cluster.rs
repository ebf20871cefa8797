//! A real JetStream cluster of `nats-server` nodes on loopback for tests.
//!
//! [`NatsCluster::start`] runs N [`NatsServer`]s, each with its own `server_name`, client port,
//! cluster (route) port and store directory, routed to every other node under one cluster name,
//! and returns once every node's JetStream API answers (the meta group has a leader). A node can
//! be stopped, killed or paused and later restarted on the same ports and store
//! ([`NatsCluster::node_mut`]); [`NatsCluster::urls`] is the comma-separated seed list clients
//! take. Every process is killed on drop and when the test process dies.

use std::time::{Duration, Instant};

use crate::NatsServer;
use crate::error::{Error, Result};
use crate::ports::{PortReservation, reserve_port};
use crate::process;

const SERVER: &str = "nats-server cluster";
/// A meta leader is elected within a few seconds of a quorum being up.
const QUORUM_TIMEOUT: Duration = Duration::from_secs(30);

/// A running JetStream cluster of `nats-server` nodes on 127.0.0.1.
#[derive(Debug)]
pub struct NatsCluster {
    name: String,
    nodes: Vec<NatsServer>,
    // Held so no other server of this process takes a stopped node's route port.
    _route_ports: Vec<PortReservation>,
}

impl NatsCluster {
    /// Starts a cluster of `size` nodes (3 for replicated streams that survive a node loss).
    pub fn start(size: usize) -> Result<NatsCluster> {
        process::start_retrying(SERVER, || start_once(size.max(1)))
    }

    /// The cluster name (`--cluster_name`, as stream placement and cluster info name it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The nodes, in start order.
    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    /// Node `index` (from 0), to stop, kill, pause or restart it.
    ///
    /// # Panics
    /// When `index` is not below the cluster size.
    pub fn node_mut(&mut self, index: usize) -> &mut NatsServer {
        &mut self.nodes[index]
    }

    /// Every node's URL, comma-separated: the seed list a NATS client (and `spec.nats.url`) takes.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until every running node's JetStream API answers, e.g. after a restart.
    pub fn wait_ready(&self) -> Result<()> {
        wait_jetstream(&self.nodes)
    }
}

fn start_once(size: usize) -> Result<NatsCluster> {
    let name = process::unique_name("signal-test-cluster");
    let client_ports = (0..size)
        .map(|_| reserve_port())
        .collect::<Result<Vec<_>>>()?;
    let route_ports = (0..size)
        .map(|_| reserve_port())
        .collect::<Result<Vec<_>>>()?;
    let mut nodes = Vec::with_capacity(size);
    for (index, client_port) in client_ports.into_iter().enumerate() {
        let routes: Vec<String> = route_ports
            .iter()
            .enumerate()
            .filter(|(other, _)| *other != index)
            .map(|(_, port)| format!("nats-route://127.0.0.1:{}", port.port()))
            .collect();
        let mut args = vec![
            "--cluster_name".to_string(),
            name.clone(),
            "--cluster".to_string(),
            format!("nats://127.0.0.1:{}", route_ports[index].port()),
        ];
        if !routes.is_empty() {
            args.extend(["--routes".to_string(), routes.join(",")]);
        }
        // A node that exits here is dropped with the ones before it; the caller retries the
        // whole cluster on a lost port race.
        nodes.push(NatsServer::start_member(
            format!("{name}-n{}", index + 1),
            client_port,
            args,
        )?);
    }
    wait_jetstream(&nodes)?;
    Ok(NatsCluster {
        name,
        nodes,
        _route_ports: route_ports,
    })
}

fn wait_jetstream(nodes: &[NatsServer]) -> Result<()> {
    let deadline = Instant::now() + QUORUM_TIMEOUT;
    loop {
        let running = nodes.iter().filter(|node| node.is_running());
        if running.clone().all(NatsServer::jetstream_ready) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let logs: Vec<_> = nodes.iter().map(NatsServer::log_file).collect();
            return Err(Error::StartTimeout {
                server: SERVER,
                timeout: QUORUM_TIMEOUT,
                log_tail: process::log_tail(&logs, 30),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpStream;

    /// One JetStream API request over the raw protocol; the reply payload.
    fn request(port: u16, subject: &str, payload: &str) -> String {
        // A node lost may hold a leader election (stream and meta groups) for several seconds.
        try_request(port, subject, &[], payload, Duration::from_secs(30)).unwrap()
    }

    /// A request with `headers` (sent as HPUB when there are any), or the error of a reply that
    /// did not come within `timeout`.
    fn try_request(
        port: u16,
        subject: &str,
        headers: &[(&str, &str)],
        payload: &str,
        timeout: Duration,
    ) -> std::io::Result<String> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(timeout))?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let publish = if headers.is_empty() {
            format!("PUB {subject} _INBOX.t {}\r\n{payload}\r\n", payload.len())
        } else {
            let block: String = headers
                .iter()
                .map(|(name, value)| format!("{name}: {value}\r\n"))
                .collect();
            let block = format!("NATS/1.0\r\n{block}\r\n");
            format!(
                "HPUB {subject} _INBOX.t {} {}\r\n{block}{payload}\r\n",
                block.len(),
                block.len() + payload.len()
            )
        };
        let request = format!(
            "CONNECT {{\"verbose\":false,\"headers\":true}}\r\nSUB _INBOX.t 1\r\n{publish}"
        );
        reader.get_mut().write_all(request.as_bytes())?;
        crate::nats::read_reply(&mut reader)?
            .ok_or_else(|| std::io::ErrorKind::UnexpectedEof.into())
    }

    #[test]
    fn three_nodes_replicate_a_stream_and_one_restarts_on_its_ports() {
        let mut cluster = NatsCluster::start(3).unwrap();
        let urls = cluster.urls();
        assert_eq!(urls.split(',').count(), 3, "{urls}");
        let port = cluster.nodes()[0].port();
        let created = request(
            port,
            "$JS.API.STREAM.CREATE.R3",
            r#"{"name":"R3","subjects":["r3.>"],"storage":"file","num_replicas":3}"#,
        );
        assert!(!created.contains("\"error\""), "{created}");
        // The stream's cluster info names all three nodes once its group formed.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let info = request(port, "$JS.API.STREAM.INFO.R3", "");
            if cluster
                .nodes()
                .iter()
                .all(|node| info.contains(node.name()))
            {
                break;
            }
            assert!(Instant::now() < deadline, "{info}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let too_many = request(
            port,
            "$JS.API.STREAM.CREATE.R5",
            r#"{"name":"R5","subjects":["r5.>"],"num_replicas":5}"#,
        );
        assert!(too_many.contains("no suitable peers"), "{too_many}");

        let (third_port, third_store) = (cluster.nodes()[2].port(), cluster.nodes()[2].store_dir());
        cluster.node_mut(2).stop();
        // Two of three keep the stream writable.
        let started = Instant::now();
        // A publish made while the stream's group elects a new leader (node 2 may have led it)
        // gets no answer: retried, with a message id so a retry is not stored twice.
        let ack = loop {
            match try_request(
                port,
                "r3.one",
                &[("Nats-Msg-Id", "one")],
                "hello",
                Duration::from_secs(3),
            ) {
                Ok(ack) if !ack.contains("\"error\"") => break ack,
                outcome => assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "no ack within 60 s of the stop: {outcome:?}"
                ),
            }
        };
        println!("first ack {:?} after the stop", started.elapsed());
        assert!(ack.contains("\"seq\":1"), "{ack}");
        cluster.node_mut(2).restart().unwrap();
        cluster.wait_ready().unwrap();
        assert_eq!(cluster.nodes()[2].port(), third_port);
        assert_eq!(cluster.nodes()[2].store_dir(), third_store);
        let info = request(third_port, "$JS.API.STREAM.INFO.R3", "");
        assert!(info.contains("\"messages\":1"), "{info}");
    }
}
