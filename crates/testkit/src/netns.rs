//! Throwaway network-namespace topologies for real-kernel tests.
//!
//! ```text
//! fabric ns: bridge br0 (underlay 198.18.0.0/24, fd18::/64 when dual-stack)
//!   ├─ ext ns:    eth0 198.18.0.2; routes the service CIDR via node1, each pod CIDR via its node
//!   └─ nodeN ns:  eth0 198.18.0.(10+N); bridge cbr0 10.244.N.1/24; ip_forward=1;
//!                 route 10.96.0.0/12 dev cbr0; other pod CIDRs via their nodes
//!        └─ pod ns: eth0 10.244.N.M/24, default via 10.244.N.1; host side "vethK" on cbr0,
//!                   hairpin on
//! ```
//!
//! Every namespace name starts with `kpt<pid>x<counter>-`, so topologies of parallel
//! tests (and parallel test processes) never clash, and namespaces left behind by a
//! killed run can be recognised and removed by the next one. Nothing is created in the
//! root namespace, so no test packet can leave the topology.

mod enter;
mod exec;
mod stale;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Command, ExitStatus, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

pub use enter::{
    NETNS_RUN_DIR, bind_tcp_in, bind_udp_in, get_sysctl, in_netns, netns_path, set_sysctls,
};
pub use exec::{ChildGuard, netns_exec, netns_exec_ok, spawn_in_netns};
pub use stale::{list_netns, remove_stale_namespaces};

use exec::{ChildRegistry, ip, ip_batch};

/// Service CIDR the nodes and the external client route (IPv4).
pub const SERVICE_CIDR_V4: &str = "10.96.0.0/12";
/// Service CIDR used when the topology is dual-stack.
pub const SERVICE_CIDR_V6: &str = "fd96::/108";
/// Most nodes a topology supports (fabric addresses are 198.18.0.(10+N)).
pub const MAX_NODES: usize = 200;

/// Errors of the namespace harness.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("invalid namespace name {0:?}")]
    InvalidName(String),
    #[error("invalid sysctl name {0:?}")]
    InvalidSysctl(String),
    #[error("open namespace {ns}: {source}")]
    Open { ns: String, source: std::io::Error },
    #[error("setns into {ns}: {source}")]
    Setns { ns: String, source: std::io::Error },
    #[error("start thread: {0}")]
    Thread(std::io::Error),
    #[error("start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("empty command line")]
    EmptyCommand,
    #[error("{command} failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("a topology needs 1..={MAX_NODES} nodes, got {0}")]
    NodeCount(usize),
    #[error("no node {0} (nodes are numbered from 1)")]
    NoSuchNode(usize),
    #[error("no pod named {0:?}")]
    NoSuchPod(String),
    #[error("pod {0:?} already exists")]
    DuplicatePod(String),
    #[error("pod CIDR of node {0} is full")]
    PodCidrFull(usize),
}

/// What to build. `TopologySpec::new(2)` gives two IPv4 nodes with default routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologySpec {
    /// Number of node namespaces (1..=[`MAX_NODES`]).
    pub nodes: usize,
    /// Also configure IPv6 (fabric fd18::/64, pods fd44:0:0:N::/64, services
    /// [`SERVICE_CIDR_V6`]) next to IPv4.
    pub dual_stack: bool,
    /// Give each node a default route via the external client, as real nodes have one.
    pub node_default_route: bool,
    /// Pre-set `route_localnet=1` on nodes. Off by default because kube-proxy itself
    /// is expected to set it for localhost NodePorts.
    pub route_localnet: bool,
}

impl TopologySpec {
    /// `nodes` IPv4 nodes with default routes via ext.
    pub fn new(nodes: usize) -> Self {
        Self {
            nodes,
            dual_stack: false,
            node_default_route: true,
            route_localnet: false,
        }
    }

    /// Enables IPv6 addresses and routes alongside IPv4.
    pub fn dual_stack(mut self, enabled: bool) -> Self {
        self.dual_stack = enabled;
        self
    }

    /// Whether nodes get a default route via ext.
    pub fn node_default_route(mut self, enabled: bool) -> Self {
        self.node_default_route = enabled;
        self
    }

    /// Whether nodes start with `route_localnet=1`.
    pub fn route_localnet(mut self, enabled: bool) -> Self {
        self.route_localnet = enabled;
        self
    }
}

impl Default for TopologySpec {
    fn default() -> Self {
        Self::new(1)
    }
}

/// A plain namespace of the topology (fabric, ext).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netns {
    /// Name under [`NETNS_RUN_DIR`], for `ip netns exec` and [`in_netns`].
    pub ns: String,
    /// Fabric IPv4 address (unspecified for the fabric namespace itself).
    pub ip: IpAddr,
    /// Fabric IPv6 address when dual-stack.
    pub ipv6: Option<IpAddr>,
}

/// A node namespace: where kube-proxy runs and its rules are loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// 1-based node number.
    pub index: usize,
    /// Kubernetes node name: `node1`, `node2`, ...
    pub name: String,
    /// Namespace name.
    pub ns: String,
    /// Fabric ("node") IPv4 address, 198.18.0.(10+N).
    pub ip: IpAddr,
    /// Fabric IPv6 address when dual-stack.
    pub ipv6: Option<IpAddr>,
    /// Pod CIDR on the node's bridge, 10.244.N.0/24.
    pub pod_cidr: IpNet,
    /// IPv6 pod CIDR when dual-stack.
    pub pod_cidr_v6: Option<IpNet>,
    /// Bridge (cbr0) address, the pods' gateway.
    pub bridge_ip: IpAddr,
    /// Bridge IPv6 address when dual-stack.
    pub bridge_ipv6: Option<IpAddr>,
}

/// A pod namespace attached to a node's bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// Pod name as given to [`Topology::add_pod`].
    pub name: String,
    /// Namespace name.
    pub ns: String,
    /// Pod IPv4 address.
    pub ip: IpAddr,
    /// Pod IPv6 address when dual-stack.
    pub ipv6: Option<IpAddr>,
    /// 1-based number of the node hosting the pod.
    pub node: usize,
    /// Host-side veth name in the node namespace.
    pub host_veth: String,
}

/// Per-node address book: which host numbers are taken and where to look next, so a
/// freed address is not handed out again at once (stale ARP/conntrack would bite).
#[derive(Debug, Default)]
struct PodIpam {
    used: BTreeSet<u8>,
    cursor: u8,
}

impl PodIpam {
    fn allocate(&mut self) -> Option<u8> {
        let hosts: Vec<u8> = (2..=254).collect();
        let start = hosts.iter().position(|h| *h > self.cursor).unwrap_or(0);
        let host = hosts[start..]
            .iter()
            .chain(&hosts[..start])
            .copied()
            .find(|h| !self.used.contains(h))?;
        self.used.insert(host);
        self.cursor = host;
        Some(host)
    }
}

/// Counts topologies made by this process, for unique name prefixes.
static TOPOLOGY_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A set of namespaces built for one test; everything is removed on drop (also while
/// unwinding from a panic), including processes started with [`Topology::spawn`].
pub struct Topology {
    spec: TopologySpec,
    prefix: String,
    fabric: Netns,
    ext: Netns,
    nodes: Vec<Node>,
    ipam: Vec<PodIpam>,
    pods: BTreeMap<String, Pod>,
    next_pod_number: usize,
    /// Every namespace created, in creation order (removed in reverse).
    created: Vec<String>,
    children: ChildRegistry,
}

impl Topology {
    /// Builds the fabric, ext and node namespaces. Best-effort removes namespaces left
    /// behind by dead processes first.
    pub fn new(spec: TopologySpec) -> Result<Topology, NetnsError> {
        if spec.nodes == 0 || spec.nodes > MAX_NODES {
            return Err(NetnsError::NodeCount(spec.nodes));
        }
        stale::remove_stale_once();
        let prefix = format!(
            "kpt{}x{}",
            std::process::id(),
            TOPOLOGY_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let fabric = Netns {
            ns: format!("{prefix}-fab"),
            ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            ipv6: None,
        };
        let ext = Netns {
            ns: format!("{prefix}-ext"),
            ip: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)),
            ipv6: spec.dual_stack.then(|| IpAddr::V6(fabric_v6(2))),
        };
        let nodes = (1..=spec.nodes)
            .map(|n| plan_node(&prefix, n, spec.dual_stack))
            .collect();
        let mut topology = Topology {
            ipam: (0..spec.nodes).map(|_| PodIpam::default()).collect(),
            spec,
            prefix,
            fabric,
            ext,
            nodes,
            pods: BTreeMap::new(),
            next_pod_number: 1,
            created: Vec::new(),
            children: ChildRegistry::default(),
        };
        // On error the partly built topology is dropped, which removes what exists.
        topology.build()?;
        Ok(topology)
    }

    fn build(&mut self) -> Result<(), NetnsError> {
        let dual = self.spec.dual_stack;
        let fabric = self.fabric.ns.clone();
        let ext = self.ext.clone();
        self.create_ns(&fabric)?;
        // The fabric is a plain L2 switch: keep its bridge out of netfilter (best
        // effort: without br_netfilter the setting does not exist and is moot).
        let _ = set_sysctls(&fabric, &[("net.bridge.bridge-nf-call-iptables", "0")]);
        let mut fabric_cmds = vec![
            "link add br0 type bridge".to_string(),
            "link set br0 up".to_string(),
        ];
        self.create_ns(&ext.ns)?;
        fabric_cmds.extend(uplink_cmds("ext", &ext.ns));
        for node in self.nodes.clone() {
            self.create_ns(&node.ns)?;
            fabric_cmds.extend(uplink_cmds(&format!("n{}", node.index), &node.ns));
        }
        ip_batch(Some(&fabric), &fabric_cmds)?;

        let mut ext_cmds = address_cmds("eth0", ext.ip, 24, ext.ipv6, 64);
        ext_cmds.push(format!(
            "route add {SERVICE_CIDR_V4} via {}",
            self.nodes[0].ip
        ));
        if let Some(node1_v6) = self.nodes[0].ipv6 {
            ext_cmds.push(format!("route add {SERVICE_CIDR_V6} via {node1_v6}"));
        }
        for node in &self.nodes {
            ext_cmds.extend(pod_cidr_routes(node));
        }
        ip_batch(Some(&ext.ns), &ext_cmds)?;

        for node in self.nodes.clone() {
            self.configure_node(&node, dual)?;
        }
        Ok(())
    }

    fn configure_node(&self, node: &Node, dual: bool) -> Result<(), NetnsError> {
        let mut sysctls = vec![
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.bridge.bridge-nf-call-iptables", "1"),
        ];
        if self.spec.route_localnet {
            sysctls.push(("net.ipv4.conf.all.route_localnet", "1"));
        }
        if dual {
            sysctls.push(("net.ipv6.conf.all.forwarding", "1"));
            sysctls.push(("net.bridge.bridge-nf-call-ip6tables", "1"));
        }
        set_sysctls(&node.ns, &sysctls)?;

        let mut cmds = address_cmds("eth0", node.ip, 24, node.ipv6, 64);
        cmds.push("link add cbr0 type bridge".to_string());
        cmds.extend(address_cmds(
            "cbr0",
            node.bridge_ip,
            24,
            node.bridge_ipv6,
            64,
        ));
        // Routing happens before OUTPUT DNAT, so the node's own connects to a ClusterIP
        // need a route covering the service CIDR.
        cmds.push(format!("route add {SERVICE_CIDR_V4} dev cbr0"));
        if dual {
            cmds.push(format!("route add {SERVICE_CIDR_V6} dev cbr0"));
        }
        for other in self.nodes.iter().filter(|other| other.index != node.index) {
            cmds.extend(pod_cidr_routes(other));
        }
        if self.spec.node_default_route {
            cmds.push(format!("route add default via {}", self.ext.ip));
            if let Some(ext_v6) = self.ext.ipv6 {
                cmds.push(format!("route add ::/0 via {ext_v6}"));
            }
        }
        ip_batch(Some(&node.ns), &cmds)
    }

    /// Creates a namespace with `lo` up and IPv6 DAD off (so IPv6 addresses are usable
    /// at once); records it for removal.
    fn create_ns(&mut self, ns: &str) -> Result<(), NetnsError> {
        ip(&["netns", "add", ns])?;
        self.created.push(ns.to_string());
        // Must precede creating interfaces: new devices copy the `default` settings.
        let dad_off = [
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
        ];
        match set_sysctls(ns, &dad_off) {
            // IPv4-only topologies do not care if IPv6 is missing.
            Err(err) if self.spec.dual_stack => return Err(err),
            _ => {}
        }
        ip(&["-n", ns, "link", "set", "lo", "up"])
    }

    /// The name prefix shared by all namespaces of this topology.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// What the topology was built from.
    pub fn spec(&self) -> &TopologySpec {
        &self.spec
    }

    /// Node number `n` (1-based, matching its name `node<n>`).
    pub fn node(&self, n: usize) -> Result<&Node, NetnsError> {
        n.checked_sub(1)
            .and_then(|i| self.nodes.get(i))
            .ok_or(NetnsError::NoSuchNode(n))
    }

    /// All nodes, node1 first.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The external client namespace (not a node; only routes into the cluster).
    pub fn ext(&self) -> &Netns {
        &self.ext
    }

    /// The namespace holding the underlay bridge.
    pub fn fabric(&self) -> &Netns {
        &self.fabric
    }

    /// A pod by name.
    pub fn pod(&self, name: &str) -> Result<&Pod, NetnsError> {
        self.pods
            .get(name)
            .ok_or_else(|| NetnsError::NoSuchPod(name.to_string()))
    }

    /// All pods, by name.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.values()
    }

    /// Names of all namespaces that currently exist for this topology.
    pub fn namespaces(&self) -> Vec<String> {
        self.created.clone()
    }

    /// Creates pod namespace `name` on node `node` (1-based) with the next free
    /// address of the node's pod CIDR.
    pub fn add_pod(&mut self, node: usize, name: &str) -> Result<Pod, NetnsError> {
        if self.pods.contains_key(name) {
            return Err(NetnsError::DuplicatePod(name.to_string()));
        }
        let node_info = self.node(node)?.clone();
        let host = self.ipam[node - 1]
            .allocate()
            .ok_or(NetnsError::PodCidrFull(node))?;
        let number = self.next_pod_number;
        self.next_pod_number += 1;
        let pod = Pod {
            name: name.to_string(),
            ns: format!("{}-pod{number}", self.prefix),
            ip: IpAddr::V4(Ipv4Addr::new(10, 244, node as u8, host)),
            ipv6: node_info
                .pod_cidr_v6
                .map(|_| IpAddr::V6(pod_v6(node, u16::from(host)))),
            node,
            host_veth: format!("veth{number}"),
        };
        if let Err(err) = self.wire_pod(&node_info, &pod) {
            self.ipam[node - 1].used.remove(&host);
            self.delete_ns(&pod.ns);
            return Err(err);
        }
        self.pods.insert(name.to_string(), pod.clone());
        Ok(pod)
    }

    fn wire_pod(&mut self, node: &Node, pod: &Pod) -> Result<(), NetnsError> {
        self.create_ns(&pod.ns)?;
        let veth = &pod.host_veth;
        ip_batch(
            Some(&node.ns),
            &[
                format!("link add {veth} type veth peer name eth0 netns {}", pod.ns),
                format!("link set {veth} master cbr0"),
                // Lets a pod reach itself through its own Service.
                format!("link set {veth} type bridge_slave hairpin on"),
                format!("link set {veth} up"),
            ],
        )?;
        let mut cmds = address_cmds("eth0", pod.ip, 24, pod.ipv6, 64);
        cmds.push(format!("route add default via {}", node.bridge_ip));
        if let Some(gateway) = node.bridge_ipv6 {
            cmds.push(format!("route add ::/0 via {gateway}"));
        }
        ip_batch(Some(&pod.ns), &cmds)
    }

    /// Removes a pod: stops its processes, deletes its veth and namespace, and frees
    /// its address.
    pub fn remove_pod(&mut self, name: &str) -> Result<(), NetnsError> {
        let pod = self
            .pods
            .remove(name)
            .ok_or_else(|| NetnsError::NoSuchPod(name.to_string()))?;
        self.children.stop_all(Some(&pod.ns));
        // Deleting the host end removes the pair at once, even while sockets still keep
        // the pod namespace alive.
        if let Ok(node) = self.node(pod.node) {
            let _ = ip(&["-n", &node.ns, "link", "del", &pod.host_veth]);
        }
        if let IpAddr::V4(v4) = pod.ip {
            self.ipam[pod.node - 1].used.remove(&v4.octets()[3]);
        }
        self.delete_ns(&pod.ns);
        Ok(())
    }

    /// Runs `argv` in namespace `ns` (`ip netns exec`); returns the output whatever the
    /// exit status.
    pub fn exec(&self, ns: &str, argv: &[&str]) -> Result<Output, NetnsError> {
        netns_exec(ns, argv)
    }

    /// Runs `argv` in `ns`, failing on a non-zero exit; returns stdout.
    pub fn exec_ok(&self, ns: &str, argv: &[&str]) -> Result<String, NetnsError> {
        netns_exec_ok(ns, argv)
    }

    /// Starts `cmd` inside `ns`; it is killed when the guard or this topology is
    /// dropped, whichever comes first.
    pub fn spawn(&self, ns: &str, cmd: Command) -> Result<ChildGuard, NetnsError> {
        let guard = spawn_in_netns(ns, cmd)?;
        self.children.register(&guard);
        Ok(guard)
    }

    fn delete_ns(&mut self, ns: &str) {
        stale::kill_processes_in(ns);
        if let Err(err) = ip(&["netns", "del", ns]) {
            tracing::warn!(%ns, %err, "could not delete namespace");
        }
        self.created.retain(|created| created != ns);
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.children.stop_all(None);
        for ns in self.created.clone().iter().rev() {
            self.delete_ns(ns);
        }
    }
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology")
            .field("prefix", &self.prefix)
            .field("nodes", &self.nodes)
            .field("pods", &self.pods)
            .finish_non_exhaustive()
    }
}

fn plan_node(prefix: &str, n: usize, dual: bool) -> Node {
    // n <= MAX_NODES (200), checked by the caller, so these fit in a u8.
    let octet = n as u8;
    let pod_cidr = Ipv4Net::new(Ipv4Addr::new(10, 244, octet, 0), 24).map(IpNet::V4);
    Node {
        index: n,
        name: format!("node{n}"),
        ns: format!("{prefix}-node{n}"),
        ip: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10 + octet)),
        ipv6: dual.then(|| IpAddr::V6(fabric_v6(10 + n as u16))),
        pod_cidr: pod_cidr.unwrap_or_else(|_| IpNet::V4(Ipv4Net::default())),
        pod_cidr_v6: dual
            .then(|| Ipv6Net::new(pod_v6(n, 0), 64).ok().map(IpNet::V6))
            .flatten(),
        bridge_ip: IpAddr::V4(Ipv4Addr::new(10, 244, octet, 1)),
        bridge_ipv6: dual.then(|| IpAddr::V6(pod_v6(n, 1))),
    }
}

fn fabric_v6(host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd18, 0, 0, 0, 0, 0, 0, host)
}

fn pod_v6(node: usize, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd44, 0, 0, node as u16, 0, 0, 0, host)
}

/// Fabric-side commands connecting namespace `ns` to br0 through a veth whose fabric
/// end is `port` and whose far end is `eth0` in `ns`.
fn uplink_cmds(port: &str, ns: &str) -> Vec<String> {
    vec![
        format!("link add {port} type veth peer name eth0 netns {ns}"),
        format!("link set {port} master br0"),
        format!("link set {port} up"),
    ]
}

/// Address commands for `dev` (IPv4, optional IPv6 without DAD), then link up.
fn address_cmds(dev: &str, v4: IpAddr, v4_len: u8, v6: Option<IpAddr>, v6_len: u8) -> Vec<String> {
    let mut cmds = vec![format!("addr add {v4}/{v4_len} dev {dev}")];
    if let Some(v6) = v6 {
        cmds.push(format!("addr add {v6}/{v6_len} dev {dev} nodad"));
    }
    cmds.push(format!("link set {dev} up"));
    cmds
}

/// Routes to `node`'s pod CIDRs via its fabric addresses.
fn pod_cidr_routes(node: &Node) -> Vec<String> {
    let mut cmds = vec![format!("route add {} via {}", node.pod_cidr, node.ip)];
    if let (Some(cidr), Some(via)) = (node.pod_cidr_v6, node.ipv6) {
        cmds.push(format!("route add {cidr} via {via}"));
    }
    cmds
}
