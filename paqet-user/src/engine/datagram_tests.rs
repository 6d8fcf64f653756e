//! Relayed UDP datagrams between two engines over the in-memory link of `tests`:
//! whole datagrams arrive intact or not at all, never twice, in both directions.

use super::datagrams::{DatagramError, DatagramEvent, MAX_DATAGRAM_PAYLOAD, WAIT_FOR_SESSION, WAITING_MAX};
use super::*;

fn connected(impair: Impairment, seed: u8) -> Sim {
    let mut sim = Sim::new(impair, seed);
    let now = sim.clock();
    sim.client.connect(now);
    sim.collect();
    assert!(sim.run_until(100_000, |s| s.client.is_connected()), "no session");
    assert!(sim.run_until(100_000, |s| s.link.is_empty()));
    sim
}

fn arrived(engine: &mut Engine) -> Vec<DatagramEvent> {
    let mut out = Vec::new();
    engine.drain_datagrams(&mut out);
    out
}

#[test]
fn datagrams_of_every_size_cross_both_ways_intact() {
    let mut sim = connected(Impairment::default(), 31);
    let target = TargetAddr::Domain("echo.test".into(), 7);
    let sizes = [0, 1, 2, 1300, 1400, 1500, 9000, 65_507, MAX_DATAGRAM_PAYLOAD];
    for (i, &len) in sizes.iter().enumerate() {
        let payload = pattern(len, i as u64);
        sim.client.send_datagram(None, 5, &target, &payload).unwrap();
        sim.collect();
        assert!(sim.run_until(10_000, |s| s.link.is_empty()));
        let got = arrived(&mut sim.server);
        assert_eq!(got.len(), 1, "size {len}");
        let DatagramEvent::Datagram {
            peer,
            flow,
            addr,
            payload: p,
        } = &got[0]
        else {
            panic!("{got:?}")
        };
        assert_eq!((*flow, addr), (5, &target));
        assert!(*p == payload, "size {len} differs");
        // The reply carries its true source.
        let source = TargetAddr::Ip("198.18.1.2:7".parse().unwrap());
        sim.server.send_datagram(Some(*peer), 5, &source, &payload).unwrap();
        sim.collect();
        assert!(sim.run_until(10_000, |s| s.link.is_empty()));
        let back = arrived(&mut sim.client);
        assert_eq!(
            back,
            vec![DatagramEvent::Datagram {
                peer: *peer,
                flow: 5,
                addr: source,
                payload
            }]
        );
    }
    assert_eq!(
        sim.client
            .send_datagram(None, 5, &target, &vec![0; MAX_DATAGRAM_PAYLOAD + 1]),
        Err(DatagramError::TooLarge(MAX_DATAGRAM_PAYLOAD + 1))
    );
}

#[test]
fn a_lossy_duplicating_reordering_link_delivers_whole_datagrams_or_none_never_twice() {
    let impair = Impairment {
        drop: 0.03,
        duplicate: 0.05,
        corrupt: 0.01,
        jitter_ms: 5,
    };
    let mut sim = connected(impair, 32);
    let target = TargetAddr::Ip("198.18.1.2:9".parse().unwrap());
    let mut sent = Vec::new();
    for i in 0..200u64 {
        let payload = pattern(1 + (i as usize * 997) % 20_000, i);
        sim.client.send_datagram(None, 1, &target, &payload).unwrap();
        sent.push(payload);
        sim.collect();
        sim.step();
    }
    assert!(sim.run_until(100_000, |s| s.link.is_empty()));
    let got = arrived(&mut sim.server);
    let mut seen = std::collections::HashSet::new();
    for ev in &got {
        let DatagramEvent::Datagram { payload, .. } = ev else {
            panic!("{ev:?}")
        };
        let i = sent
            .iter()
            .position(|s| s == payload)
            .expect("a datagram that was never sent");
        assert!(seen.insert(i), "datagram {i} delivered twice");
    }
    assert!(got.len() > 100, "only {} of 200 arrived", got.len());
    assert!(got.len() < 200, "a lossy link lost none: is the loss applied?");
    // Whatever stayed incomplete is gone after the timeout.
    sim.now += super::datagrams::REASSEMBLY_TIMEOUT + Duration::from_secs(1);
    let now = sim.clock();
    sim.server.handle_timeout(now);
    assert_eq!(sim.server.reassembly_bytes(), 0);
}

#[test]
fn datagrams_sent_before_the_session_wait_for_it_within_bounds() {
    let mut sim = Sim::new(Impairment::default(), 33);
    let target = TargetAddr::Ip("198.18.1.2:9".parse().unwrap());
    let stale = pattern(100, 0);
    sim.client.send_datagram(None, 1, &target, &stale).unwrap();
    // Older than WAIT_FOR_SESSION by the time the session comes: dropped, counted.
    sim.now += WAIT_FOR_SESSION + Duration::from_millis(500);
    let now = sim.clock();
    sim.client.handle_timeout(now);
    let fresh: Vec<Vec<u8>> = (1..WAITING_MAX as u64).map(|i| pattern(1000, i)).collect();
    for payload in &fresh {
        sim.client.send_datagram(None, 2, &target, payload).unwrap();
    }
    // The queue is full (in count): refused as before.
    assert_eq!(
        sim.client.send_datagram(None, 2, &target, b"one too many"),
        Err(DatagramError::NoSession)
    );
    // A server does not queue for a client it has no session with.
    let server_target = TargetAddr::Ip("198.18.1.2:9".parse().unwrap());
    assert_eq!(
        sim.server.send_datagram(Some(7), 1, &server_target, b"x"),
        Err(DatagramError::NoSession)
    );
    sim.client.connect(now);
    sim.collect();
    assert!(sim.run_until(100_000, |s| s.client.is_connected()), "no session");
    assert!(sim.run_until(100_000, |s| s.link.is_empty()));
    let got: Vec<Vec<u8>> = arrived(&mut sim.server)
        .into_iter()
        .map(|e| match e {
            DatagramEvent::Datagram { flow: 2, payload, .. } => payload,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(got, fresh, "the waiting datagrams, in order, and not the stale one");
    assert_eq!(sim.client.datagram_counters().expired_waiting, 1);
}

#[test]
fn a_closed_flow_is_reported_to_the_server() {
    let mut sim = connected(Impairment::default(), 34);
    sim.client.close_datagram_flow(9);
    sim.collect();
    assert!(sim.run_until(10_000, |s| s.link.is_empty()));
    assert!(matches!(
        arrived(&mut sim.server).as_slice(),
        [DatagramEvent::FlowClosed { flow: 9, .. }]
    ));
}

#[test]
fn a_client_that_only_sends_keeps_hearing_the_server_and_keeps_its_session() {
    let mut sim = connected(Impairment::default(), 37);
    let target = TargetAddr::Ip("198.18.1.2:9".parse().unwrap());
    let start = sim.now;
    let handshakes = sim.client.counters().handshakes;
    let server_sent = sim.datagrams_sent[1];
    let mut received = 0usize;
    // Eight seconds of an upload the server never answers by itself: twice the time
    // after which a client that hears nothing takes the server for gone.
    for i in 0..800u64 {
        let due = start + Duration::from_millis(10 * i);
        assert!(sim.run_until(10_000, |s| s.now >= due));
        sim.now = sim.now.max(due);
        sim.client.send_datagram(None, 1, &target, &[7; 100]).unwrap();
        sim.collect();
        sim.step();
        received += arrived(&mut sim.server).len();
    }
    assert!(sim.run_until(10_000, |s| s.link.is_empty()));
    received += arrived(&mut sim.server).len();
    assert_eq!(received, 800, "every datagram of the upload arrived");
    assert_eq!(
        sim.client.counters().handshakes,
        handshakes,
        "the client took the server for gone and handshook again"
    );
    assert!(
        sim.datagrams_sent[1] > server_sent,
        "the server said nothing during the upload"
    );
    assert!(sim.client.counters().keepalives >= 6);
}
