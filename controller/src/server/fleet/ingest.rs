//! What the controller does with a device's message: decode it, check that it
//! names the device whose topic it came on, store it, and feed the rollout
//! engine. A message that fails any check is dropped and counted
//! (`messages_refused`); the device is not told.

use edgefleet_shared::cbor::DecodeError;
use edgefleet_shared::protocol::{
    self, DeviceState, DeviceTopic, Event, FetchRequest, SampleBatch, SampleUpload, Telemetry,
    Topic,
};
use edgefleet_shared::time::now_ms;
use edgefleet_shared::{DeviceId, Digest};
use tokio::sync::mpsc;

use super::{Fleet, FleetError};
use crate::server::db::{DbError, SampleParts};

/// Why a device's message was dropped.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The topic is not `<prefix>/devices/<id>/<kind>`.
    #[error("not a device topic of this prefix")]
    NotDeviceTopic,
    /// The payload names another device than its topic.
    #[error("the message names device {named} but was published on {topic}'s topic")]
    OtherDevice {
        /// The device the payload names.
        named: DeviceId,
        /// The device of the topic.
        topic: DeviceId,
    },
    /// The payload does not decode as the topic's message.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Storing it failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Acting on an event failed.
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// The telemetry writer is behind.
    #[error("telemetry queue full; sample dropped")]
    TelemetryQueueFull,
    /// The event writer stopped (the controller is shutting down).
    #[error("the event writer stopped")]
    Stopped,
    /// A topic devices do not publish on.
    #[error("{0} is not read by this controller")]
    NotRead(&'static str),
    /// Samples nobody asked this device for.
    #[error("samples for command {command}, which was not a request_samples sent to {device}")]
    UnaskedSamples {
        /// The command the upload answers.
        command: u64,
        /// The device.
        device: DeviceId,
    },
    /// A sample upload larger than a batch may be.
    #[error("sample upload {command} is over {limit} bytes; dropped")]
    SamplesTooLarge {
        /// The command the upload answers.
        command: u64,
        /// The cap.
        limit: usize,
    },
    /// A batch whose parts disagree on the bundle.
    #[error("the sample batch names bundle {} but its parts name {}", batch.short(), parts.short())]
    SampleBundleMismatch {
        /// The bundle the joined batch names.
        batch: Digest,
        /// The bundle its parts named.
        parts: Digest,
    },
    /// Chunks of a bundle this controller does not hold.
    #[error("fetch for unknown bundle {}", .0.short())]
    UnknownBundle(Digest),
    /// Chunks of a bundle the device was never told to install.
    #[error("{device} asked for chunks of bundle {}, which it was never told to install", bundle.short())]
    NotOffered {
        /// The device.
        device: DeviceId,
        /// The bundle.
        bundle: Digest,
    },
}

/// Where the ingest task hands the messages that are stored in batches.
pub(super) struct Queues {
    /// To the telemetry writer (a full queue drops the report: the device
    /// sends it again, unacknowledged).
    pub telemetry: mpsc::Sender<(Telemetry, u64)>,
    /// To the event writer (a full queue makes ingest wait: an event is
    /// sent once).
    pub events: mpsc::Sender<(Event, u64)>,
    /// To the state writer (a full queue makes ingest wait).
    pub states: mpsc::Sender<(DeviceState, u64)>,
}

impl Fleet {
    /// Handles one message from a device topic.
    pub(super) async fn ingest(
        &self,
        topic: &str,
        payload: &[u8],
        queues: &Queues,
    ) -> Result<(), IngestError> {
        let Some(Topic::Device { device, kind }) = self.topics.parse(topic) else {
            return Err(IngestError::NotDeviceTopic);
        };
        let same = |named: &DeviceId| {
            if *named == device {
                Ok(())
            } else {
                Err(IngestError::OtherDevice {
                    named: named.clone(),
                    topic: device.clone(),
                })
            }
        };
        let now = now_ms();
        match kind {
            // An empty payload clears a retained state: nothing to store.
            DeviceTopic::State if payload.is_empty() => {}
            DeviceTopic::State => {
                let s: DeviceState = protocol::decode(payload)?;
                same(&s.device)?;
                if queues.states.send((s, now)).await.is_err() {
                    return Err(IngestError::Stopped);
                }
            }
            DeviceTopic::Events => {
                let e: Event = protocol::decode(payload)?;
                same(&e.device)?;
                // Every replica stores the event; the rollout lease's holder
                // applies it, once, whichever replica stored it first
                // (`Fleet::event_writer`).
                if queues.events.send((e, now)).await.is_err() {
                    return Err(IngestError::Stopped);
                }
            }
            DeviceTopic::Telemetry => {
                let t: Telemetry = protocol::decode(payload)?;
                same(&t.device)?;
                if queues.telemetry.try_send((t, now)).is_err() {
                    return Err(IngestError::TelemetryQueueFull);
                }
            }
            DeviceTopic::Fetch => {
                let r: FetchRequest = protocol::decode(payload)?;
                self.enqueue_chunks(&device, &r).await?;
            }
            DeviceTopic::Samples => {
                let u: SampleUpload = protocol::decode(payload)?;
                self.ingest_samples(&device, u, now).await?;
            }
            DeviceTopic::Commands | DeviceTopic::Acks => {
                return Err(IngestError::NotRead(kind.segment()));
            }
        }
        Ok(())
    }

    /// Stores one part of a sample upload; when the batch is whole, its samples.
    /// Only answers to this controller's own request, and within the batch cap.
    async fn ingest_samples(
        &self,
        device: &DeviceId,
        u: SampleUpload,
        now: u64,
    ) -> Result<(), IngestError> {
        let asked = self.db.command_action(device.as_str(), u.command).await?;
        if asked.as_deref() != Some("request_samples") {
            return Err(IngestError::UnaskedSamples {
                command: u.command,
                device: device.clone(),
            });
        }
        let joined = self
            .db
            .insert_sample_part(device.as_str(), &u, SampleBatch::MAX_LEN, now)
            .await?;
        match joined {
            SampleParts::TooLarge => Err(IngestError::SamplesTooLarge {
                command: u.command,
                limit: SampleBatch::MAX_LEN,
            }),
            SampleParts::Complete(bytes) => {
                let batch = SampleBatch::from_bytes(&bytes)?;
                if batch.digest != u.digest {
                    return Err(IngestError::SampleBundleMismatch {
                        batch: batch.digest,
                        parts: u.digest,
                    });
                }
                let n = self
                    .db
                    .insert_samples(device.as_str(), u.command, batch, now)
                    .await?;
                tracing::info!(device = %device, samples = n, "samples stored");
                Ok(())
            }
            SampleParts::Waiting => Ok(()),
        }
    }
}
