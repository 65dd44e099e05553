//! An API server that goes away and comes back, as a client sees it: a TCP forwarder that can
//! cut every connection and refuse new ones. Tests point a component's client at it to check
//! what it does during an outage without stopping the API server every other test uses. It
//! counts what the client sends (connection attempts, refused ones included, and bytes), so a
//! test can tell that a component sent nothing at all.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TCP forwarder to `upstream` (`host:port`); stops forwarding when dropped.
pub struct FlakyProxy {
    pub addr: SocketAddr,
    cut: tokio::sync::broadcast::Sender<()>,
    refusing: Arc<AtomicBool>,
    counts: Arc<Counts>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Counts {
    connections: AtomicU64,
    open: AtomicU64,
    bytes_from_client: AtomicU64,
}

/// Counts a forwarded connection as open until dropped.
struct Open(Arc<Counts>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl FlakyProxy {
    pub async fn start(upstream: String) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, _) = tokio::sync::broadcast::channel(1);
        let refusing = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let (cut2, refusing2, counts2) = (cut.clone(), refusing.clone(), counts.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                counts2.connections.fetch_add(1, Ordering::SeqCst);
                if refusing2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let upstream = upstream.clone();
                let mut cut = cut2.subscribe();
                let counts = counts2.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    counts.open.fetch_add(1, Ordering::SeqCst);
                    let _open = Open(counts.clone());
                    let (mut client_read, mut client_write) = inbound.into_split();
                    let (mut upstream_read, mut upstream_write) = outbound.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            match client_read.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    counts
                                        .bytes_from_client
                                        .fetch_add(n as u64, Ordering::SeqCst);
                                    if upstream_write.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = upstream_write.shutdown().await;
                    };
                    let down = async {
                        let _ = tokio::io::copy(&mut upstream_read, &mut client_write).await;
                        let _ = client_write.shutdown().await;
                    };
                    tokio::select! {
                        _ = async { tokio::join!(up, down) } => {}
                        _ = cut.recv() => {}
                    }
                });
            }
        });
        Ok(FlakyProxy {
            addr,
            cut,
            refusing,
            counts,
            task,
        })
    }

    /// Connections the client opened so far, refused ones included.
    pub fn connections(&self) -> u64 {
        self.counts.connections.load(Ordering::SeqCst)
    }

    /// Connections forwarded and still open (a watch holds one for as long as it runs).
    pub fn open(&self) -> u64 {
        self.counts.open.load(Ordering::SeqCst)
    }

    /// Bytes the client sent so far (through forwarded connections).
    pub fn bytes_from_client(&self) -> u64 {
        self.counts.bytes_from_client.load(Ordering::SeqCst)
    }

    /// `true`: cut every open connection and refuse new ones; `false`: forward again.
    pub fn outage(&self, down: bool) {
        self.refusing.store(down, Ordering::SeqCst);
        if down {
            let _ = self.cut.send(());
        }
    }

    /// A copy of `config` whose API server is reached through this proxy.
    pub fn config_through(&self, config: &kube::Config) -> kube::Config {
        let mut proxied = config.clone();
        if let Ok(url) = format!("https://{}", self.addr).parse() {
            proxied.cluster_url = url;
        }
        proxied
    }
}

impl Drop for FlakyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
