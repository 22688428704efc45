//! A multi-region topology on this machine: a primary, streaming replicas grouped in regions, and a latency
//! relay in front of every server so that "nearest" is real and measurable. Servers are only reachable through
//! their relays, so a gateway sees the distance of its region to each of them.

use crate::{Cluster, ClusterOptions, Relay};
use anyhow::Result;
use std::net::SocketAddr;
use std::time::Duration;

/// A region to create: its name, how many replicas, and how far it is from the gateway (one way).
#[derive(Clone, Debug)]
pub struct RegionSpec {
    pub name: String,
    pub replicas: usize,
    pub one_way: Duration,
}

impl RegionSpec {
    pub fn new(name: &str, replicas: usize, one_way: Duration) -> RegionSpec {
        RegionSpec {
            name: name.to_string(),
            replicas,
            one_way,
        }
    }
}

/// A server and the relay in front of it.
pub struct Node {
    pub cluster: Cluster,
    pub relay: Relay,
}

impl Node {
    /// Where clients reach it (through the relay).
    pub fn addr(&self) -> SocketAddr {
        self.relay.addr()
    }
}

pub struct RegionNodes {
    pub name: String,
    pub replicas: Vec<Node>,
}

pub struct Topology {
    pub primary_region: String,
    pub primary: Node,
    pub regions: Vec<RegionNodes>,
}

impl Topology {
    /// Starts the primary (in `primary_region`, `primary_one_way` away) and every region's replicas.
    pub fn start(
        primary_region: &str,
        primary_one_way: Duration,
        regions: &[RegionSpec],
    ) -> Result<Topology> {
        let primary = Cluster::start(&ClusterOptions::default())?;
        let primary_relay = Relay::start(local(primary.port()), primary_one_way)?;
        let mut built = Vec::new();
        for spec in regions {
            let mut replicas = Vec::new();
            for _ in 0..spec.replicas {
                let cluster = primary.start_replica()?;
                let relay = Relay::start(local(cluster.port()), spec.one_way)?;
                replicas.push(Node { cluster, relay });
            }
            built.push(RegionNodes {
                name: spec.name.clone(),
                replicas,
            });
        }
        Ok(Topology {
            primary_region: primary_region.to_string(),
            primary: Node {
                cluster: primary,
                relay: primary_relay,
            },
            regions: built,
        })
    }

    /// The `primary:` and `regions:` sections of a gateway configuration for `database`, with the superuser's
    /// credentials in the URLs (used by the gateway's monitors).
    pub fn gateway_yaml(&self, database: &str) -> String {
        let url = |addr: SocketAddr| {
            format!(
                "postgres://postgres:{}@{addr}/{database}",
                crate::SUPERUSER_PASSWORD
            )
        };
        let mut yaml = format!(
            "primary: {{ url: '{}', region: {} }}\nregions:\n",
            url(self.primary.addr()),
            self.primary_region
        );
        for region in &self.regions {
            let replicas: Vec<String> = region
                .replicas
                .iter()
                .map(|n| format!("'{}'", url(n.addr())))
                .collect();
            yaml.push_str(&format!(
                "  - {{ name: {}, replicas: [ {} ] }}\n",
                region.name,
                replicas.join(", ")
            ));
        }
        yaml
    }

    /// Every replica, with its region name.
    pub fn replicas(&self) -> impl Iterator<Item = (&str, &Node)> {
        self.regions
            .iter()
            .flat_map(|r| r.replicas.iter().map(move |n| (r.name.as_str(), n)))
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
