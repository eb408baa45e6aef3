#!/usr/bin/env node
// The snapshot-restore handler role (Firecracker's UFFD page-fault handler) in Node, against
// the wire protocol only: @grpc/grpc-js + @grpc/proto-loader over protos/uffd/v1.
//
// Started by `uffdgrpc recipe snapshot-restore --processes --role-command handler="node
// clients/node/snapshot_handler.js"` with the role arguments (--server URL --machine ID
// --state key=value ...). It speaks the recipe line protocol: signals other roles raised
// arrive on stdin as "@recipe signal NAME"; its counters leave on stdout as
// "@recipe count KEY VALUE".
//
// What it does (as SnapshotHandler does in C#): reads the snapshot through its own read-only
// shared mapping of the memfd, then serves the guest's uffd on the batched Serve stream:
// every batch is drained first (REMOVE events mark pages released by the balloon), then each
// fault is answered with UFFDIO_COPY of the page at the same offset of the snapshot, or
// UFFDIO_ZEROPAGE for a released page. EAGAIN (an event queued unread) keeps the fault for
// the next batch; EEXIST (another fault on the page was served first) is followed by a WAKE.
// --wrong-handler in-order decides each fault as it is read, before later REMOVEs of the
// same batch: the mistake firecracker#4990/#5021 fixed.
'use strict';

const path = require('path');
const readline = require('readline');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PAGE = 4096n;
const BASE = 0x7f20_0000_0000n; // SnapshotRestoreRecipe.Base

function parseArgs(argv) {
  const a = { state: {}, set: {} };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    const v = argv[i + 1];
    if (k === '--state' || k === '--set') {
      const eq = v.indexOf('=');
      a[k.slice(2)][v.slice(0, eq)] = v.slice(eq + 1);
      i++;
    } else if (k.startsWith('--')) {
      a[k.slice(2)] = v;
      i++;
    }
  }
  return a;
}

const args = parseArgs(process.argv.slice(2));
const root = path.resolve(__dirname, '..', '..', 'protos');
const def = protoLoader.loadSync(['uffd/v1/mm.proto', 'uffd/v1/thread.proto', 'uffd/v1/userfaultfd.proto'], {
  includeDirs: [root], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
});
const v1 = grpc.loadPackageDefinition(def).uffd.v1;
const address = args.server.replace(/^https?:\/\//, '');
const mm = new v1.MmService(address, grpc.credentials.createInsecure());
const threads = new v1.ThreadService(address, grpc.credentials.createInsecure());
const uffds = new v1.UserfaultfdService(address, grpc.credentials.createInsecure());
const call = (client, method, req) => new Promise((resolve, reject) => client[method](req, (e, r) => (e ? reject(e) : resolve(r))));

// Signals from the other roles.
const signals = new Map();
function signal(name) {
  if (!signals.has(name)) {
    let resolve;
    const p = new Promise((r) => { resolve = r; });
    signals.set(name, { p, resolve });
  }
  return signals.get(name);
}
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const m = /^@recipe signal (.+)$/.exec(line);
  if (m) signal(m[1]).resolve();
});

const counters = {};
const count = (k, n = 1) => { counters[k] = (counters[k] || 0) + n; };

function expectOk(errno, what) {
  if (errno !== 'ERRNO_UNSPECIFIED') throw new Error(`${what}: ${errno}`);
}

async function readSnapshot(machineId, fileId, len) {
  const { mm: info } = await call(mm, 'CreateMm', { machine_id: machineId });
  try {
    const r = await call(mm, 'Mmap', { mm_id: info.mm_id, addr: BASE.toString(), len: len.toString(), prot: 1, shared: true, file_id: fileId, read_only_fd: true });
    expectOk(r.errno, 'mmap of the memfd');
    const { thread } = await call(threads, 'CreateThread', { mm_id: info.mm_id });
    const { result } = await call(threads, 'Access', { thread_id: thread.thread_id, access: { addr: BASE.toString(), span: { length: len.toString() } } });
    expectOk(result.errno, 'reading the snapshot');
    return result.values;
  } finally {
    await call(mm, 'DestroyMm', { mm_id: info.mm_id });
  }
}

async function serve(uffdId, snapshot, inOrder, done) {
  const removed = new Set();
  const stream = uffds.Serve();
  const batches = [];
  const results = [];
  let wake = null;
  const notify = () => { if (wake) { const w = wake; wake = null; w(); } };
  let ended = false;
  stream.on('data', (r) => {
    if (r.messages.length) batches.push(r.messages);
    if (r.results.length) results.push(r.results);
    notify();
  });
  stream.on('error', () => { ended = true; notify(); });
  stream.on('end', () => { ended = true; notify(); });
  done.then(() => { ended = true; notify(); });
  const next = () => new Promise((r) => { wake = r; });
  stream.write({ uffd_id: uffdId, max_messages: 1024 });

  const markRemoved = (ev) => {
    count('remove-events');
    for (let p = BigInt(ev.start); p < BigInt(ev.end); p += PAGE) removed.add(p);
  };
  let pending = []; // { page, zero } (zero: the in-order handler's decision when it read the fault)
  let tag = 0;
  while (!ended) {
    if (batches.length === 0) { await next(); continue; }
    // Drain: every batch that arrived is read before anything is served.
    const msgs = batches.splice(0).flat();
    if (!inOrder) for (const m of msgs) if (m.arg === 'remove') markRemoved(m.remove);
    for (const m of msgs) {
      if (m.arg === 'pagefault') {
        count('faults-read');
        const page = BigInt(m.pagefault.address) & ~(PAGE - 1n);
        pending.push({ page, zero: inOrder ? removed.has(page) : null });
      } else if (m.arg === 'remove' && inOrder) {
        markRemoved(m.remove);
      }
    }
    const asked = pending;
    pending = [];
    const resolutions = asked.map((f) => {
      const zero = f.zero ?? removed.has(f.page);
      const t = String(++tag);
      if (zero) return { tag: t, uffdio_zeropage: { start: f.page.toString(), len: PAGE.toString() } };
      const off = Number(f.page - BASE);
      return { tag: t, uffdio_copy: { dst: f.page.toString(), src: '139637976727552', len: PAGE.toString(), data: snapshot.subarray(off, off + Number(PAGE)) } };
    });
    if (resolutions.length === 0) continue;
    count('round-trips');
    stream.write({ resolutions });
    while (results.length === 0 && !ended) await next();
    if (ended) break;
    const res = results.shift();
    const wakes = [];
    res.forEach((r, i) => {
      const zero = resolutions[i].uffdio_zeropage !== undefined;
      if (r.errno === 'ERRNO_UNSPECIFIED') {
        count(zero ? 'zeropages' : 'pages-copied');
        if (!zero) count('bytes-copied', Number(PAGE));
      } else if (r.errno === 'ERRNO_EAGAIN') {
        count('eagain-retries');
        pending.push(asked[i]);
      } else if (r.errno === 'ERRNO_EEXIST') {
        wakes.push({ tag: String(++tag), uffdio_wake: { start: asked[i].page.toString(), len: PAGE.toString() } });
      } else if (r.errno !== 'ERRNO_ENOENT') {
        throw new Error(`resolving the fault at 0x${asked[i].page.toString(16)}: ${r.errno}`);
      }
    });
    if (wakes.length) {
      count('round-trips');
      count('wakes', wakes.length);
      stream.write({ resolutions: wakes });
      while (results.length === 0 && !ended) await next();
      results.shift();
    }
  }
  stream.cancel();
}

async function main() {
  if (args.role !== 'handler') throw new Error(`this program is the handler role, not ${args.role}`);
  const variant = args.set.variant || 'plain';
  if (variant !== 'plain') throw new Error(`the Node handler serves the plain variant, not ${variant}`);
  const pages = BigInt(args.state.pages);
  await signal('snapshot').p;
  const snapshot = await readSnapshot(args.machine, args.state.file, pages * PAGE);
  await signal('vcpus-running').p;
  count('node-handler', 1);
  await serve(args.state.uffd, snapshot, args['wrong-handler'] === 'in-order', signal('guest-done').p);
  for (const [k, v] of Object.entries(counters)) process.stdout.write(`@recipe count ${k} ${v}\n`);
  process.exit(0);
}

main().catch((e) => {
  process.stdout.write(`@recipe note handler: failed: ${String(e.message || e).replace(/\n/g, ' ')}\n`);
  process.exit(1);
});
