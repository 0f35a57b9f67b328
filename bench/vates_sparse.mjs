// Sparse read with @vates/nbd-client (Xen Orchestra's NBD client), for bench/bench.sh.
// usage: node vates_sparse.mjs HOST PORT EXPORT BLOCKLIST CONCURRENCY READAHEAD [CERT|-] [BLOCKSIZE]
// BLOCKLIST: one block index per line (blocks of BLOCKSIZE, default 65536), read with readBlock.
// CERT: a PEM file enables TLS. The library passes it as the *client* cert with
// rejectUnauthorized: false, i.e. the server is not verified (and the server must not ask
// for a client certificate: qemu-nbd needs verify-peer=off).
// bench.sh copies this file next to its node_modules ($BENCH_DIR/vates) so that the import resolves.
import fs from 'node:fs'
import MultiNbdClient from '@vates/nbd-client/multi.mjs'

const [address, port, exportname, blist, conc, ra, certFile = '-', bsArg] = process.argv.slice(2)
if (!blist) {
  console.error('usage: node vates_sparse.mjs HOST PORT EXPORT BLOCKLIST CONCURRENCY READAHEAD [CERT|-] [BLOCKSIZE]')
  process.exit(2)
}
const BS = Number(bsArg ?? 65536)
const indexes = fs.readFileSync(blist, 'utf8').trim().split('\n').map(Number)
const settings = { address, port: Number(port), exportname }
if (certFile !== '-') settings.cert = fs.readFileSync(certFile, 'utf8')
const client = new MultiNbdClient(settings, { nbdConcurrency: Number(conc), readAhead: Number(ra) })
const t0 = process.hrtime.bigint()
await client.connect()
const t1 = process.hrtime.bigint()
let bytes = 0
for await (const data of client.readBlocks(function* () {
  for (const index of indexes) yield { index, size: BS }
})) {
  if (data.length !== BS) throw new Error(`short block: ${data.length} bytes`)
  bytes += data.length
}
const t2 = process.hrtime.bigint()
await client.disconnect()
if (bytes !== indexes.length * BS) throw new Error(`read ${bytes} bytes, expected ${indexes.length * BS}`)
const secs = Number(t2 - t1) / 1e9
console.error(`connect_ms=${(Number(t1 - t0) / 1e6).toFixed(1)} requests=${indexes.length} bytes=${bytes} secs=${secs.toFixed(3)} MB/s=${(bytes / secs / 1e6).toFixed(0)}`)
