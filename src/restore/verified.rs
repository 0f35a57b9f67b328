//! A chain of streams read as verified blocks, for a restore whose target is not a local
//! image (`restore --xapi`): the same opening, chain rules, decoding and checks as
//! [`super::restore`], with the writing left to the caller.

use super::input::{pipelined, Input, StreamInput};
use super::{check_chain, open_inputs, PayloadDecoder, RestoreError, StartingPoint};
use cbtstream_proto::stream::{Codec, Header, Item, StreamError, Trailer};

/// Size of each read by [`OpenStream::next_item`].
const RECORD_READ_CHUNK: usize = 1 << 20;

/// One verified piece of a stream, in stream order.
pub enum Block<'a> {
    /// Decompressed data whose checksum matched; `stored` is its size in the stream.
    Data {
        offset: u64,
        data: &'a [u8],
        stored: u64,
    },
    /// A range that reads as zeroes at the stream's point.
    Zero { offset: u64, length: u64 },
}

/// What one stream held, once its trailer and digest verified.
#[derive(Debug, Clone)]
pub struct Verified {
    pub trailer: Trailer,
    pub data_records: u64,
    pub zero_records: u64,
    /// Stream bytes read.
    pub input_bytes: u64,
}

/// An input whose header was read.
pub struct OpenStream {
    input: Input,
    pub header: Header,
}

/// Opens every input, reads its header and checks that the streams form a chain. A first
/// incremental (one with no full stream before it) is checked against `start(input name)`:
/// (point, source, how to name the target), which fails when the target is not known to be
/// complete.
pub fn open_chain(
    inputs: Vec<StreamInput>,
    start: StartingPoint<'_>,
) -> Result<Vec<OpenStream>, RestoreError> {
    let streams = open_inputs(inputs)?;
    check_chain(&streams, start)?;
    Ok(streams
        .into_iter()
        .map(|(input, header)| OpenStream { input, header })
        .collect())
}

/// Opens one input on its own and reads its header, with no chain to check it against
/// (`verify --read-data` checks the ids itself).
pub fn open_stream(input: StreamInput) -> Result<OpenStream, RestoreError> {
    let mut input = Input::open_input(input)?;
    let header = input.read_header()?;
    Ok(OpenStream { input, header })
}

/// Decompresses and checks DATA records; reused from one stream to the next.
pub struct Payloads(PayloadDecoder);

impl Payloads {
    pub fn new() -> Result<Payloads, RestoreError> {
        PayloadDecoder::new()
            .map(Payloads)
            .map_err(|e| RestoreError::Internal(format!("cannot create a zstd decompressor: {e}")))
    }

    /// Decompresses (if needed) one DATA record of `input` and checks its checksum.
    #[allow(clippy::too_many_arguments)]
    pub fn decode<'a>(
        &'a mut self,
        input: &str,
        index: u64,
        offset: u64,
        length: u64,
        codec: Codec,
        checksum: u64,
        payload: &'a [u8],
    ) -> Result<&'a [u8], RestoreError> {
        self.0
            .decode(index, offset, length, codec, checksum, payload)
            .map_err(|error| RestoreError::Damaged {
                input: input.to_owned(),
                error,
            })
    }
}

impl OpenStream {
    pub fn name(&self) -> &str {
        &self.input.name
    }

    /// The next item, its structure and order checked, its payload as stored (not yet
    /// checked against its checksum: see [`Payloads::decode`]); `None` once the trailer and
    /// digest verified and the input ended right after them. Read on the caller's thread.
    pub fn next_item(&mut self) -> Result<Option<Item>, RestoreError> {
        self.input.next_item(RECORD_READ_CHUNK)
    }

    /// Stream bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.input.bytes_read
    }

    /// Hands every record to `each` as a verified block, in order; `Ok` only once the
    /// trailer and the stream digest verified. A block handed over may still belong to a
    /// stream that turns out damaged later: the caller must not treat the target as
    /// complete before this returns `Ok`.
    pub fn verify(
        mut self,
        payloads: &mut Payloads,
        mut each: impl FnMut(Block<'_>) -> Result<(), RestoreError>,
    ) -> Result<Verified, RestoreError> {
        let name = self.input.name.clone();
        let (mut data_records, mut zero_records) = (0, 0);
        let mut trailer = None;
        pipelined(&mut self.input, |item| match item {
            Item::Header(_) => Ok(()),
            Item::Data {
                index,
                offset,
                length,
                codec,
                checksum,
                payload,
            } => {
                let data = payloads
                    .0
                    .decode(index, offset, length, codec, checksum, &payload)
                    .map_err(|error| RestoreError::Damaged {
                        input: name.clone(),
                        error,
                    })?;
                data_records += 1;
                each(Block::Data {
                    offset,
                    data,
                    stored: payload.len() as u64,
                })
            }
            Item::Zero { offset, length, .. } => {
                zero_records += 1;
                each(Block::Zero { offset, length })
            }
            Item::End(t) => {
                trailer = Some(t);
                Ok(())
            }
        })?;
        // The reader ends without error only after the decoder accepted the end of the
        // stream, which requires the verified trailer.
        let Some(trailer) = trailer else {
            return Err(self.input.damaged(StreamError::Truncated {
                records: self.input.decoder.records(),
                at: "without a trailer".into(),
            }));
        };
        Ok(Verified {
            trailer,
            data_records,
            zero_records,
            input_bytes: self.input.bytes_read,
        })
    }
}
