//! The compose network without an engine: each service on its own loopback address (127.S.0.N,
//! as a container has its own address on the project network), service names resolved by
//! rewriting them to those addresses in what a container is given, `0.0.0.0` read as the
//! container's own address, bind mounts by rewriting the container path to the host path, and
//! published ports forwarded from 127.0.0.1 as Docker's proxy does.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Service names and bind mounts of one project.
#[derive(Debug, Clone, Default)]
pub struct Network {
    /// Service name -> its address.
    pub addresses: BTreeMap<String, String>,
    /// Service name -> (container path, host path) of each bind mount.
    pub mounts: BTreeMap<String, Vec<(String, String)>>,
}

impl Network {
    /// Addresses 127.`subnet`.0.N in the order of the services' names.
    pub fn new<'a>(services: impl IntoIterator<Item = &'a String>, subnet: u8) -> Network {
        let address = |(i, name): (usize, &String)| (name.clone(), format!("127.{subnet}.0.{}", i + 1));
        let addresses = services.into_iter().enumerate().map(address).collect();
        Network { addresses, mounts: BTreeMap::new() }
    }

    pub fn address(&self, service: &str) -> &str {
        &self.addresses[service]
    }

    /// `value` as the process of `service` must see it: service names in URLs and `host:port`
    /// values become addresses, `0.0.0.0` the service's own address, mounted container paths
    /// (items of a comma-separated list) host paths.
    pub fn rewrite(&self, service: &str, value: &str) -> String {
        let mut out = value.replace("0.0.0.0:", &format!("{}:", self.address(service)));
        for (name, addr) in &self.addresses {
            out = out.replace(&format!("://{name}:"), &format!("://{addr}:"));
            if let Some(rest) = out.strip_prefix(&format!("{name}:")) {
                out = format!("{addr}:{rest}");
            }
        }
        let mounts = self.mounts.get(service).map(Vec::as_slice).unwrap_or(&[]);
        out.split(',').map(|item| host_path(item, mounts)).collect::<Vec<_>>().join(",")
    }
}

/// `item` with a mounted container path prefix replaced by its host path.
pub fn host_path(item: &str, mounts: &[(String, String)]) -> String {
    for (target, source) in mounts {
        if item == target {
            return source.clone();
        }
        if let Some(rest) = item.strip_prefix(target.as_str()).filter(|r| r.starts_with('/')) {
            return format!("{source}{rest}");
        }
    }
    item.to_string()
}

/// A published port: connections to 127.0.0.1:`published` are relayed to `target`.
pub struct Forwarder {
    stop: Arc<AtomicBool>,
}

impl Forwarder {
    /// Fails when the host port is taken, naming it (as `docker compose up` would).
    pub fn start(published: u16, target: String) -> Forwarder {
        let listener = TcpListener::bind(("127.0.0.1", published))
            .unwrap_or_else(|e| panic!("published port 127.0.0.1:{published} (for {target}) is taken: {e}"));
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => relay(client, target.clone()),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
                    Err(_) => break,
                }
            }
        });
        Forwarder { stop }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Copies bytes both ways between `client` and a new connection to `target` until either closes.
fn relay(client: TcpStream, target: String) {
    client.set_nonblocking(false).unwrap();
    let Ok(server) = TcpStream::connect(&target) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let pipe = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
    };
    pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
    pipe(server, client);
}
