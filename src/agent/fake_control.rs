//! A control plane for the agent's unit tests: a real tonic server on a loopback socket behind
//! mesh mTLS, whose Discovery streams the test drives by hand, message by message.

use std::sync::Arc;
use std::time::Duration;

use rcgen::KeyPair;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tonic::{Request, Response, Status, Streaming};

use super::ControlClient;
use crate::identity::{CaMaterial, CertificateAuthority, SpiffeId};
use crate::proto::discovery::discovery_server::{Discovery, DiscoveryServer};
use crate::proto::discovery::{DiscoveryRequest, DiscoveryResponse};
use crate::tls::{CertStore, TrustBundle, config};

/// How long a test waits for the agent to do what it should, before failing.
pub const DEADLINE: Duration = Duration::from_secs(10);

const CONTROL_ID: &str = "spiffe://cluster.local/ns/palisade-system/sa/palisade-control";
/// The identity of the sidecar under test.
pub const SIDECAR_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

/// The control plane's end of one Discovery stream.
pub struct Stream {
    requests: Streaming<DiscoveryRequest>,
    responses: mpsc::Sender<Result<DiscoveryResponse, Status>>,
}

impl Stream {
    /// The sidecar's next request.
    pub async fn request(&mut self) -> DiscoveryRequest {
        match tokio::time::timeout(DEADLINE, self.requests.message()).await {
            Ok(Ok(Some(request))) => request,
            Ok(other) => panic!("the sidecar's request stream ended: {other:?}"),
            Err(_) => panic!("no request from the sidecar within {DEADLINE:?}"),
        }
    }

    /// Pushes a snapshot.
    pub async fn push(&self, response: DiscoveryResponse) {
        self.responses.send(Ok(response)).await.expect("the response stream is open");
    }

    /// Ends the stream with an error status, as a control plane going away does.
    pub async fn break_with(self, status: Status) {
        let _ = self.responses.send(Err(status)).await;
    }
}

/// A running fake control plane and a client for it.
pub struct FakeControl {
    pub client: ControlClient,
    streams: mpsc::UnboundedReceiver<Stream>,
}

impl FakeControl {
    /// Starts the server on 127.0.0.1 with a fresh CA; the client trusts that CA, expects the
    /// control plane's identity and presents [`SIDECAR_ID`].
    pub async fn start() -> FakeControl {
        let material = CaMaterial::generate("cluster.local", 1).unwrap();
        let ca = CertificateAuthority::load(material.clone()).unwrap();
        let bundle = TrustBundle::from_pem(&material.root_cert_pem).unwrap();
        let control_id: SpiffeId = CONTROL_ID.parse().unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls =
            TlsAcceptor::from(config::server_config(issue(&ca, CONTROL_ID), bundle.clone(), false, &[config::ALPN_H2]));
        let (conn_tx, conn_rx) = mpsc::channel(4);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (tls, conn_tx) = (tls.clone(), conn_tx.clone());
                tokio::spawn(async move {
                    if let Ok(stream) = tls.accept(tcp).await {
                        let _ = conn_tx.send(Ok::<_, std::io::Error>(stream)).await;
                    }
                });
            }
        });
        let (streams_tx, streams) = mpsc::unbounded_channel();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(DiscoveryServer::new(Service { streams: streams_tx }))
                .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(conn_rx)),
        );

        let client = ControlClient::new(&addr.to_string(), bundle, issue(&ca, SIDECAR_ID), control_id);
        FakeControl { client, streams }
    }

    /// The next Discovery stream a sidecar opens.
    pub async fn next_stream(&mut self) -> Stream {
        match tokio::time::timeout(DEADLINE, self.streams.recv()).await {
            Ok(Some(stream)) => stream,
            Ok(None) => panic!("the fake control plane stopped"),
            Err(_) => panic!("the sidecar opened no Discovery stream within {DEADLINE:?}"),
        }
    }
}

/// A certificate store holding a fresh certificate for `id`.
fn issue(ca: &CertificateAuthority, id: &str) -> Arc<CertStore> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let issued = ca.sign_workload(&id.parse().unwrap(), &key, Duration::from_secs(3600), &[]).unwrap();
    let chain = crate::tls::certs_from_pem(&issued.chain_pem).unwrap();
    let signing_key = crate::tls::provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
        .unwrap();
    let store = CertStore::new();
    store.set(Arc::new(CertifiedKey::new(chain, signing_key)), issued.not_after);
    store
}

struct Service {
    streams: mpsc::UnboundedSender<Stream>,
}

type Responses = tokio_stream::wrappers::ReceiverStream<Result<DiscoveryResponse, Status>>;

#[tonic::async_trait]
impl Discovery for Service {
    type StreamStream = Responses;

    async fn stream(&self, request: Request<Streaming<DiscoveryRequest>>) -> Result<Response<Responses>, Status> {
        let (responses, rx) = mpsc::channel(4);
        self.streams
            .send(Stream { requests: request.into_inner(), responses })
            .map_err(|_| Status::unavailable("the test is over"))?;
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}
