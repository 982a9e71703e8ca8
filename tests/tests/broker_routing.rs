//! The embedded broker's routing, as the vendored rumqttd indexes it: a filter
//! without a wildcard matches its own topic only and is found by name; wildcard
//! filters are matched against every topic (vendor/rumqttd/EDGEFLEET.md, 4).
//! Each case here crosses that index one way: the filter made before or after
//! its topic first carried a message, exact or wildcard, retained or not.
//! rumqttd as the controller starts it (`start_embedded`), plain TCP on
//! loopback, real MQTT clients.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

/// A real MQTT client, and the topics of the messages it received while its
/// helpers waited for an acknowledgement (rumqttd may send a retained message
/// before its SUBACK).
struct Client {
    mqtt: AsyncClient,
    events: EventLoop,
    seen: Vec<String>,
}

impl Client {
    /// Connects and waits for the CONNACK.
    async fn connect(broker: std::net::SocketAddr, id: &str) -> Client {
        let mut options = MqttOptions::new(id, broker.ip().to_string(), broker.port());
        options.set_keep_alive(Duration::from_secs(30));
        let (mqtt, events) = AsyncClient::new(options, 64);
        let mut client = Client {
            mqtt,
            events,
            seen: Vec::new(),
        };
        client
            .until(&format!("{id}'s CONNACK"), |p| {
                matches!(p, Packet::ConnAck(_))
            })
            .await;
        client
    }

    /// Polls until a packet `done` accepts, keeping the messages received.
    async fn until(&mut self, what: &str, done: impl Fn(&Packet) -> bool) {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.events.poll()).await {
                Ok(Ok(Event::Incoming(p))) if done(&p) => return,
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => self.keep(&p),
                Ok(Ok(_)) => {}
                other => panic!("no {what}: {other:?}"),
            }
        }
    }

    fn keep(&mut self, p: &rumqttc::Publish) {
        assert_eq!(
            p.payload.as_ref(),
            p.topic.as_bytes(),
            "payload of {}",
            p.topic
        );
        self.seen.push(p.topic.clone());
    }

    /// Subscribes at QoS 1 and waits for the SUBACK.
    async fn subscribe(&mut self, filter: &str) {
        self.mqtt
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe queued");
        self.until(&format!("SUBACK for {filter}"), |p| {
            matches!(p, Packet::SubAck(_))
        })
        .await;
    }

    /// Publishes at QoS 1 (the topic as payload) and waits for the PUBACK.
    async fn publish(&mut self, topic: &str, retain: bool) {
        self.mqtt
            .publish(topic, QoS::AtLeastOnce, retain, topic.as_bytes().to_vec())
            .await
            .expect("publish queued");
        self.until(&format!("PUBACK for {topic}"), |p| {
            matches!(p, Packet::PubAck(_))
        })
        .await;
    }

    /// The topics of the messages received since the last call, and within
    /// `wait`, sorted (rumqttd keeps no order across a client's filters).
    async fn received(&mut self, wait: Duration) -> Vec<String> {
        let until = tokio::time::Instant::now() + wait;
        while let Ok(event) = tokio::time::timeout_at(until, self.events.poll()).await {
            if let Event::Incoming(Packet::Publish(p)) = event.expect("client's connection") {
                self.keep(&p);
            }
        }
        let mut topics = std::mem::take(&mut self.seen);
        topics.sort();
        topics
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_and_wildcard_filters_receive_their_topics_whenever_they_were_made() {
    let (broker, _acceptor) =
        edgefleet::server::broker::start_embedded("127.0.0.1:0".parse().expect("addr"), None)
            .expect("embedded broker");
    let mut device = Client::connect(broker, "publisher").await;

    // Topics that carried a message before any filter named them: one
    // retained, one not (rumqttd keeps no route for a topic nobody matched).
    device.publish("f/devices/early/state", true).await;
    device.publish("f/devices/early/telemetry", false).await;

    // An exact subscriber and a wildcard one, after those topics.
    let mut exact = Client::connect(broker, "exact").await;
    exact.subscribe("f/devices/early/state").await;
    exact.subscribe("f/devices/later/cmd").await;
    let mut wild = Client::connect(broker, "wild").await;
    wild.subscribe("f/devices/+/state").await;
    wild.subscribe("f/bundles/#").await;

    // The retained message reaches both at once (exact: by name; wildcard: by
    // a pass over the retained messages).
    assert_eq!(
        exact.received(Duration::from_millis(500)).await,
        ["f/devices/early/state"]
    );
    assert_eq!(
        wild.received(Duration::from_millis(500)).await,
        ["f/devices/early/state"]
    );

    // New messages: on a topic first seen now (routed by the exact filter's
    // name and the wildcard scan), on an old topic, and on topics only the
    // wildcard matches, and on one no filter matches.
    for topic in [
        "f/devices/later/cmd",
        "f/devices/early/state",
        "f/devices/new/state",
        "f/bundles/abc/chunks",
        "f/devices/early/telemetry",
    ] {
        device.publish(topic, false).await;
    }
    assert_eq!(
        exact.received(Duration::from_millis(500)).await,
        ["f/devices/early/state", "f/devices/later/cmd"]
    );
    assert_eq!(
        wild.received(Duration::from_millis(500)).await,
        [
            "f/bundles/abc/chunks",
            "f/devices/early/state",
            "f/devices/new/state"
        ]
    );

    // An exact filter made after its topic already had a route (through the
    // wildcard) is added to that route; and a second subscriber to an
    // existing exact filter shares it.
    let mut late = Client::connect(broker, "late").await;
    late.subscribe("f/devices/new/state").await;
    late.subscribe("f/devices/later/cmd").await;
    device.publish("f/devices/new/state", false).await;
    device.publish("f/devices/later/cmd", false).await;
    assert_eq!(
        late.received(Duration::from_millis(500)).await,
        ["f/devices/later/cmd", "f/devices/new/state"]
    );
    assert_eq!(
        exact.received(Duration::from_millis(500)).await,
        ["f/devices/later/cmd"]
    );
    assert_eq!(
        wild.received(Duration::from_millis(500)).await,
        ["f/devices/new/state"]
    );
}
