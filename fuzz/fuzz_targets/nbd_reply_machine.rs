//! The client's reply state machine (`Replies`) against any byte stream from a server.
//!
//! Input: a mode byte (bit 0 structured, bit 1 extended headers, which imply structured), the
//! negotiated `base:allocation` context id (4 bytes, big-endian), then the server's reply bytes. The
//! requests outstanding are fixed (cookie = index + 1 in `REQUESTS`); the seeds under
//! corpus/nbd_reply_machine are real replies of qemu-nbd and nbdkit to exactly these.
//! Besides "no panic", the target checks the machine's promises: every Data/Hole range lies
//! inside its request and is covered once, and a READ that ends well is covered whole.
#![no_main]
use bytes::BytesMut;
use cbtstream_proto::nbd::consts::{CMD_BLOCK_STATUS, CMD_READ};
use cbtstream_proto::nbd::{Event, Negotiated, Outcome, Outstanding, Replies};
use libfuzzer_sys::fuzz_target;

const REQUESTS: [(u16, u64, u64); 4] = [
    (CMD_READ, 0, 65536),
    (CMD_BLOCK_STATUS, 0, 1 << 20),
    (CMD_READ, (1 << 20) - 512, 4096),
    (CMD_READ, 512, 512),
];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Some((ctx, mut stream)) = rest.split_first_chunk::<4>() else {
        return;
    };
    let negotiated = Negotiated {
        size: 1 << 20,
        transmission_flags: 0,
        structured: mode & 3 != 0,
        extended: mode & 2 != 0,
        meta_context: Some(u32::from_be_bytes(*ctx)),
        block_size: None,
        via_export_name: false,
    };
    let mut m = Replies::new(&negotiated);
    let mut input = BytesMut::new();
    // Per cookie: how many times each byte of the request was delivered.
    let mut covered: Vec<Option<Vec<u8>>> = vec![None; REQUESTS.len()];
    let mut begun = [false; REQUESTS.len()];
    let mut feed = |input: &mut BytesMut, want: usize| -> bool {
        // Deliver in small pieces to exercise every partial state.
        while input.len() < want {
            let n = stream.len().min(7);
            if n == 0 {
                return false;
            }
            input.extend_from_slice(&stream[..n]);
            stream = &stream[n..];
        }
        true
    };
    loop {
        let Ok(event) = m.poll(&mut input) else {
            return;
        };
        match event {
            Event::NeedBytes(n) => {
                assert!(n > input.len());
                if !feed(&mut input, n) {
                    return;
                }
            }
            Event::NeedRequest(cookie) => {
                let i = cookie.wrapping_sub(1) as usize;
                if i >= REQUESTS.len() || begun[i] {
                    return; // the driver fails with UnknownCookie
                }
                begun[i] = true;
                let (cmd, offset, length) = REQUESTS[i];
                m.begin(
                    cookie,
                    Outstanding {
                        cmd,
                        offset,
                        length,
                    },
                )
                .unwrap();
                covered[i] = Some(vec![0; length as usize]);
            }
            Event::Data { cookie, ref range } | Event::Hole { cookie, ref range } => {
                let i = cookie as usize - 1;
                assert_eq!(REQUESTS[i].0, CMD_READ);
                assert!(!range.is_empty());
                let cov = covered[i].as_mut().unwrap();
                for c in &mut cov[range.clone()] {
                    assert_eq!(*c, 0, "byte delivered twice");
                    *c = 1;
                }
                if matches!(event, Event::Data { .. }) {
                    if !feed(&mut input, range.len()) {
                        return;
                    }
                    let _ = input.split_to(range.len());
                }
            }
            Event::Done { cookie, outcome } => {
                let i = cookie as usize - 1;
                let cov = covered[i].take().unwrap();
                match outcome {
                    Outcome::Read => assert!(cov.iter().all(|&c| c == 1)),
                    Outcome::BlockStatus(extents) => {
                        assert!(!extents.is_empty());
                        let total: u64 = extents.iter().map(|e| e.length).sum();
                        assert!(total <= REQUESTS[i].2);
                        assert!(extents.iter().all(|e| e.length > 0));
                    }
                    Outcome::Failed(_) => {}
                }
            }
        }
    }
});
