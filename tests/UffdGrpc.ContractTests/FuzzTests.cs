using System.Diagnostics;
using CsCheck;
using Google.Protobuf;
using Microsoft.Extensions.DependencyInjection;
using UffdGrpc.Server.Hosting;
using Xunit.Abstractions;

namespace UffdGrpc.ContractTests;

/// <summary>The fuzzer runs alone, so the server's memory it measures is its own.</summary>
[CollectionDefinition(nameof(FuzzCollection), DisableParallelization = true)]
public sealed class FuzzCollection;

/// <summary>
/// A seeded, replayable property-based fuzzer: long random sequences of RPCs with random and
/// boundary arguments against the in-process server. After every step: no INTERNAL or
/// UNKNOWN status, no deadline missed by a call that cannot legitimately sleep, every
/// machine's <c>Kernel.CheckInvariants()</c> empty and no machine broken, and the managed
/// heap within <see cref="MemoryBudget"/>. A failure reports the seed and the shrunk
/// sequence; replay with <c>UFFDGRPC_FUZZ_SEED=&lt;seed&gt;</c>. <c>UFFDGRPC_FUZZ_STEPS</c>
/// sets the total number of steps (default 10^5, in sequences of <see cref="StepsPerSequence"/>),
/// <c>UFFDGRPC_FUZZ_THREADS</c> how many sequences run at once (default 2; each sequence has
/// its own machines and checks only them, so a sequence replays alone).
/// </summary>
/// <remarks>
/// Sizes that would make a successful request use memory proportional to a huge range are
/// capped in the generator (until machines have memory limits): a successful Mmap is at
/// most <see cref="MaxMapBytes"/> inside a <see cref="Window"/>-byte window, so populate,
/// POPULATE_READ/WRITE, UFFDIO_ZEROPAGE/POISON/COPY and touches over huge lengths meet at
/// most that much mapped memory; huge Mmap lengths are sent only where they must fail.
/// </remarks>
[Collection(nameof(FuzzCollection))]
public sealed class FuzzTests(GrpcTestFixture fx, ITestOutputHelper output) : IClassFixture<GrpcTestFixture>
{
    public const int StepsPerSequence = 100;
    public const long MemoryBudget = 768L << 20;
    private const ulong Pg = 4096;
    private const ulong Base = 0x7f00_0000_0000;
    public const ulong Window = 32UL << 20;
    public const ulong MaxMapBytes = 8UL << 20;
    private const ulong TaskSize = 0x0000_7fff_ffff_f000;
    private static readonly TimeSpan s_callDeadline = TimeSpan.FromSeconds(2);
    private static readonly TimeSpan s_sleepDeadline = TimeSpan.FromMilliseconds(15);

    public enum K
    {
        CreateMachine, GetMachine, ListMachines, ConfigureMachine, DestroyMachine, Kpageflags,
        CreateMm, GetMm, ListMms, DestroyMm, Mmap, Mprotect, ClearRefs, Munmap, Mremap, Madvise, Fork,
        ProcessVmReadv, ProcessVmWritev, CreateFile, ListVmas, DumpPageTable, Pagemap, Smaps, PagemapScan, Digest,
        CreateThread, GetThread, ListThreads, AccessTouch, AccessSpan, StartOp, WaitOp, TakeCompletions,
        Userfaultfd, Api, Register, Unregister, Wake, Writeprotect, Copy, Zeropage, Continue, Poison, Move,
        Poll, Read, Close, ReadEvents, Serve,
    }

    /// <summary>One RPC: which, two object picks, two addresses, a length and two free arguments (modes, flags, counts).</summary>
    public sealed record Step(K Kind, int I, int J, ulong Addr, ulong Len, ulong Addr2, ulong X, uint Y)
    {
        public override string ToString() => $"{Kind}(i={I}, j={J}, addr=0x{Addr:x}, len=0x{Len:x}, addr2=0x{Addr2:x}, x=0x{X:x}, y={Y})";
    }

    private static readonly ulong[] s_boundaryAddrs =
    [
        0, 1, Pg - 1, Pg, TaskSize, TaskSize - Pg, 0x7fff_ffff_ffff, 1UL << 47, ulong.MaxValue, ulong.MaxValue - 4095, Base - Pg, Base + Window,
    ];

    private static readonly ulong[] s_boundaryLens =
    [
        0, 1, Pg - 1, Pg + 1, ulong.MaxValue, ulong.MaxValue - 4095, ulong.MaxValue - 4096, 1UL << 63, 1UL << 46, 1UL << 47, TaskSize, Window,
    ];

    private static readonly Gen<ulong> s_genAddr = Gen.Frequency(
        (8, Gen.ULong[0, (Window / Pg) - 1].Select(p => Base + (p * Pg))),
        (3, Gen.ULong[0, (Window / (2UL << 20)) - 1].Select(p => Base + (p * (2UL << 20)))),
        (1, Gen.ULong[0, Window - 1].Select(o => Base + o)),
        (1, Gen.OneOf(s_boundaryAddrs)),
        (1, Gen.ULong));

    private static readonly Gen<ulong> s_genLen = Gen.Frequency(
        (8, Gen.ULong[1, 16].Select(p => p * Pg)),
        (2, Gen.OneOf(512 * Pg, 1024 * Pg, 2048 * Pg)),
        (2, Gen.ULong[1, MaxMapBytes / Pg].Select(p => p * Pg)),
        (2, Gen.OneOf(s_boundaryLens)),
        (1, Gen.ULong));

    private static readonly Gen<K> s_genKind = Gen.Frequency(
        (1, Gen.OneOf(K.CreateMachine, K.GetMachine, K.ListMachines, K.ConfigureMachine, K.Kpageflags, K.CreateMm, K.GetMm, K.ListMms)),
        (1, Gen.OneOf(K.DestroyMachine, K.DestroyMm, K.ClearRefs, K.ListThreads, K.GetThread, K.ListVmas, K.CreateFile)),
        (8, Gen.OneOf(K.Mmap, K.Mmap, K.Mprotect, K.Munmap, K.Mremap, K.Madvise, K.Fork, K.ProcessVmReadv, K.ProcessVmWritev)),
        (3, Gen.OneOf(K.DumpPageTable, K.Pagemap, K.Smaps, K.PagemapScan, K.Digest)),
        (8, Gen.OneOf(K.CreateThread, K.AccessTouch, K.AccessSpan, K.StartOp, K.StartOp, K.StartOp, K.WaitOp, K.TakeCompletions)),
        (12, Gen.OneOf(K.Userfaultfd, K.Api, K.Register, K.Register, K.Unregister, K.Wake, K.Writeprotect, K.Copy, K.Copy, K.Zeropage, K.Continue, K.Poison, K.Move)),
        (3, Gen.OneOf(K.Poll, K.Read, K.Read, K.Close, K.ReadEvents, K.Serve)));

    private static readonly Gen<Step> s_genStep =
        Gen.Select(s_genKind, Gen.Int[0, 63], Gen.Int[0, 63], s_genAddr, s_genLen)
            .SelectMany(t => Gen.Select(s_genAddr, Gen.Frequency((4, Gen.ULong[0, 15]), (2, Gen.ULong[0, 0x1ffff]), (1, Gen.ULong)), Gen.Frequency((4, Gen.UInt[0, 16]), (1, Gen.UInt)),
                (addr2, x, y) => new Step(t.Item1, t.Item2, t.Item3, t.Item4, t.Item5, addr2, x, y)));

    /// <summary>A sequence of steps (each run starts with two machines, three mms and six threads).</summary>
    public static Gen<Step[]> GenSequence => s_genStep.Array[StepsPerSequence];

    private static int EnvInt(string name, int dflt) =>
        int.TryParse(Environment.GetEnvironmentVariable(name), out var v) && v > 0 ? v : dflt;

    [Fact]
    public async Task Random_rpc_sequences_keep_every_invariant()
    {
        var steps = EnvInt("UFFDGRPC_FUZZ_STEPS", 100_000);
        var seed = Environment.GetEnvironmentVariable("UFFDGRPC_FUZZ_SEED");
        var iter = Math.Max(1, steps / StepsPerSequence);
        var registry = fx.Services.GetRequiredService<MachineRegistry>();
        var sw = Stopwatch.StartNew();
        var stats = new Stats();
        await GenSequence.SampleAsync(
            seq => new Runner(fx, registry, stats).RunAsync(seq),
            writeLine: output.WriteLine,
            seed: string.IsNullOrEmpty(seed) ? null : seed,
            iter: string.IsNullOrEmpty(seed) ? iter : 1,
            threads: EnvInt("UFFDGRPC_FUZZ_THREADS", 2),
            print: seq => string.Join("\n", seq.Select((s, i) => $"  {i,3}: {s}")));
        output.WriteLine($"fuzz: {stats.Steps} steps in {iter} sequences, {sw.Elapsed.TotalSeconds:F1} s; " +
            $"{stats.Ok} OK, {stats.Errno} with an errno, {stats.Status} refused with a status, {stats.Slept} slept past their deadline; " +
            $"invariant checks {stats.Checks}; peak managed heap {stats.PeakHeap >> 20} MiB");
        Assert.Empty(UnexpectedErrors(fx));
    }

    /// <summary>The server's error log lines: a request must never cause one.</summary>
    private static List<string> UnexpectedErrors(GrpcTestFixture fx) => [.. fx.Errors];

    private sealed class Stats
    {
        public long Steps, Ok, Errno, Status, Slept, Checks, PeakHeap;
    }

    /// <summary>Runs one sequence on its own machines and destroys them afterwards.</summary>
    private sealed class Runner(GrpcTestFixture fx, MachineRegistry registry, Stats stats)
    {
        private readonly UffdClient _c = fx.NewClient();
        private readonly List<long> _machines = [];
        private readonly List<long> _mms = [];
        private readonly List<long> _threads = [];
        private readonly List<long> _uffds = [];
        private readonly List<long> _files = [];
        private readonly List<long> _ops = [];

        private static long PickFrom(List<long> ids, int i, ulong x, List<long>? other = null)
        {
            switch (i % 16)
            {
                case 13:
                    return other is { Count: > 0 } ? other[i % other.Count] : 0;
                case 14:
                    return (long)(x >> 1) | 1;
                case 15:
                    return i % 2 == 0 ? 0 : -1;
            }
            return ids.Count == 0 ? 0 : ids[i % ids.Count];
        }

        private long Machine(Step s) => PickFrom(_machines, s.I, s.X, _mms);
        private long Mm(Step s) => PickFrom(_mms, s.I, s.X, _threads);
        private long Mm2(Step s) => PickFrom(_mms, s.J, s.X ^ 0x55);
        private long Thread(Step s) => PickFrom(_threads, s.I, s.X, _mms);
        private long OptThread(Step s) => s.J % 3 == 0 ? 0 : PickFrom(_threads, s.J, s.X, _uffds);
        private long Uffd(Step s) => PickFrom(_uffds, s.I, s.X, _mms);
        private long File(Step s) => PickFrom(_files, s.J, s.X, _machines);

        public async Task RunAsync(Step[] seq)
        {
            try
            {
                // Two machines, so every pool holds foreign ids; one with swap and THP always.
                await Setup();
                for (var i = 0; i < seq.Length; i++)
                {
                    await Execute(seq[i], i);
                    Check(seq[i], i);
                }
            }
            finally
            {
                foreach (var m in _machines)
                {
                    try
                    {
                        await _c.Machines.DestroyMachineAsync(new DestroyMachineRequest { MachineId = m }, deadline: DateTime.UtcNow + s_callDeadline);
                    }
                    catch (RpcException)
                    {
                        // Destroyed by a step already.
                    }
                }
            }
        }

        private async Task Setup()
        {
            var a = (await _c.Machines.CreateMachineAsync(new CreateMachineRequest(), deadline: DateTime.UtcNow + s_callDeadline)).Machine.MachineId;
            var b = (await _c.Machines.CreateMachineAsync(new CreateMachineRequest
            {
                Settings = new MachineSettings { Swap = true, SoftDirty = true, Thp = ThpMode.Always },
            }, deadline: DateTime.UtcNow + s_callDeadline)).Machine.MachineId;
            _machines.Add(a);
            _machines.Add(b);
            foreach (var m in new[] { a, a, b })
            {
                var mm = (await _c.Mm.CreateMmAsync(new CreateMmRequest { MachineId = m })).Mm.MmId;
                _mms.Add(mm);
                _threads.Add((await _c.Threads.CreateThreadAsync(new CreateThreadRequest { MmId = mm })).Thread.ThreadId);
                _threads.Add((await _c.Threads.CreateThreadAsync(new CreateThreadRequest { MmId = mm })).Thread.ThreadId);
            }
        }

        private void Check(Step s, int i)
        {
            Interlocked.Increment(ref stats.Steps);
            foreach (var host in registry.Machines)
            {
                if (host.Destroyed || !_machines.Contains(host.Id))
                    continue;
                if (host.Broken is not null)
                    throw new InvalidOperationException($"step {i} {s}: machine {host.Id} is broken: {host.Broken}");
                var v = host.Kernel.CheckInvariants();
                Interlocked.Increment(ref stats.Checks);
                if (v.Count > 0)
                    throw new InvalidOperationException($"step {i} {s}: machine {host.Id} invariants:\n    " + string.Join("\n    ", v));
            }
            var heap = GC.GetTotalMemory(false);
            if (heap > MemoryBudget)
            {
                heap = GC.GetTotalMemory(true);
                if (heap > MemoryBudget)
                    throw new InvalidOperationException($"step {i} {s}: managed heap {heap >> 20} MiB over the {MemoryBudget >> 20} MiB budget");
            }
            stats.PeakHeap = Math.Max(stats.PeakHeap, heap);
            var errors = UnexpectedErrors(fx);
            if (errors.Count > 0)
                throw new InvalidOperationException($"step {i} {s}: the server logged errors: {string.Join("; ", errors)}");
        }

        private static bool MaySleep(Step s) => s.Kind is K.AccessTouch or K.AccessSpan or K.Munmap or K.Mremap or K.Madvise or K.Fork
            or K.ProcessVmReadv or K.ProcessVmWritev or K.WaitOp or K.Poll or K.Read or K.ReadEvents or K.Serve;

        private async Task Execute(Step s, int i)
        {
            // A call that may sleep is cancelled by the client after s_sleepDeadline (the thread
            // stays asleep in the model); every other call has a server deadline it must meet.
            var sleeps = MaySleep(s);
            using var cts = sleeps ? new CancellationTokenSource(s_sleepDeadline) : null;
            DateTime? deadline = sleeps ? null : DateTime.UtcNow + s_callDeadline;
            try
            {
                var errno = await Call(s, deadline, cts?.Token ?? CancellationToken.None);
                if (errno is null or Errno.Unspecified)
                    Interlocked.Increment(ref stats.Ok);
                else
                    Interlocked.Increment(ref stats.Errno);
            }
            catch (RpcException e) when (e.StatusCode is not (StatusCode.Internal or StatusCode.Unknown or StatusCode.DeadlineExceeded or StatusCode.Cancelled))
            {
                Interlocked.Increment(ref stats.Status);
            }
            catch (RpcException e) when (sleeps && (e.StatusCode is StatusCode.Cancelled
                || (cts!.IsCancellationRequested && e.StatusCode == StatusCode.Unknown && e.Status.Detail == "Exception was thrown by handler.")
                || (cts!.IsCancellationRequested && e.StatusCode == StatusCode.Internal && e.Status.Detail.StartsWith("Error starting gRPC call.", StringComparison.Ordinal))))
            {
                // The second and third forms are races of the in-memory TestServer transport on
                // a call this client cancelled itself: the aborted request's trailers reached the
                // client before its own cancel, or the client's HTTP send failed on the
                // already-completed response pipe (a status the client makes, not the server).
                Interlocked.Increment(ref stats.Slept);
            }
            catch (OperationCanceledException) when (sleeps)
            {
                Interlocked.Increment(ref stats.Slept);
            }
            catch (RpcException e)
            {
                throw new InvalidOperationException($"step {i} {s}: {e.StatusCode} {e.Status.Detail}", e);
            }
        }

        private static uint Prot(Step s) => s.Y % 8 == 7 ? (uint)s.X : (uint)(s.X & 7);

        private static ulong Mode(Step s) => s.Y % 8 == 7 ? s.X : s.X & 7;

        private static readonly int[] s_advices = [0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 25, 102, 103, -1, 1000];

        private static int Advice(Step s) => s_advices[(int)(s.X % (ulong)s_advices.Length)];

        private static IEnumerable<Iovec> Iovs(Step s, ulong addr, int n) =>
            Enumerable.Range(0, n).Select(k => new Iovec { Base = addr + ((ulong)k * 2 * Pg), Len = k == 0 ? Math.Min(s.Len, 1UL << 20) : Pg });

        private static byte[] Bytes(ulong seed, ulong len)
        {
            var b = new byte[(int)Math.Min(len, 64 * 1024)];
            new Random((int)seed).NextBytes(b);
            return b;
        }

        private ThreadOp MakeOp(Step s)
        {
            var op = new ThreadOp();
            switch (s.Y % 8)
            {
                case 0:
                    op.Access = new AccessOp { Addr = s.Addr, Write = s.X % 2 == 1, Origin = (AccessOrigin)(s.J % 4), Touch = new TouchPattern { Pages = (uint)(s.Len / Pg % 4097), Value = (uint)(s.X >> 8) } };
                    break;
                case 1:
                    op.Access = s.X % 2 == 1
                        ? new AccessOp { Addr = s.Addr, Write = true, Span = new ByteSpan { Data = ByteString.CopyFrom(Bytes(s.X, s.Len % 9000)) } }
                        : new AccessOp { Addr = s.Addr, Span = new ByteSpan { Length = s.Len % 70000 } };
                    break;
                case 2:
                    op.Populate = new PopulateOp { Start = s.Addr, Len = s.Len, Write = s.X % 2 == 1 };
                    break;
                case 3:
                    op.Madvise = new MadviseOp { Start = s.Addr, Len = s.Len, Advice = Advice(s) };
                    break;
                case 4:
                    op.Munmap = new MunmapOp { Start = s.Addr, Len = s.Len };
                    break;
                case 5:
                    op.Mremap = new MremapOp { OldAddr = s.Addr, Len = s.Len, NewAddr = s.Addr2 };
                    break;
                case 6:
                    op.Fork = new ForkOp();
                    break;
                case 7:
                    if (s.X % 5 == 0)
                        break; // no op at all
                    op.ProcessVm = new ProcessVmOp { RemoteMmId = Mm2(s), Write = s.X % 2 == 1, Flags = s.X % 7 == 0 ? 1UL : 0 };
                    op.ProcessVm.LocalIov.Add(Iovs(s, s.Addr, (int)(s.X % 3)));
                    op.ProcessVm.RemoteIov.Add(Iovs(s, s.Addr2, (int)((s.X >> 2) % 3)));
                    break;
            }
            return op;
        }

        private void Add(List<long> ids, long id)
        {
            if (id != 0 && ids.Count < 64)
                ids.Add(id);
        }

        /// <summary>Issues the step's RPC; returns its in-band errno, or null when the call has none.</summary>
        private async Task<Errno?> Call(Step s, DateTime? deadline, CancellationToken ct)
        {
            var c = _c;
            switch (s.Kind)
            {
                case K.CreateMachine:
                    if (_machines.Count >= 4)
                        return null;
                    var cm = await c.Machines.CreateMachineAsync(new CreateMachineRequest
                    {
                        Profile = (KernelProfile)(s.Y % 4),
                        Settings = new MachineSettings { Swap = s.X % 2 == 1, SoftDirty = s.X % 4 >= 2, MemoryFailure = s.X % 8 >= 4, Thp = (ThpMode)(s.J % 5) },
                    }, deadline: deadline, cancellationToken: ct);
                    Add(_machines, cm.Machine.MachineId);
                    return null;
                case K.GetMachine:
                    await c.Machines.GetMachineAsync(new GetMachineRequest { MachineId = Machine(s) }, deadline: deadline, cancellationToken: ct);
                    return null;
                case K.ListMachines:
                    await c.Machines.ListMachinesAsync(new ListMachinesRequest { PageSize = (int)s.Y, PageToken = s.X % 3 == 0 ? s.X.ToString(System.Globalization.CultureInfo.InvariantCulture) : "" }, deadline: deadline, cancellationToken: ct);
                    return null;
                case K.ConfigureMachine:
                    await c.Machines.ConfigureMachineAsync(new ConfigureMachineRequest
                    {
                        MachineId = Machine(s),
                        Settings = new MachineSettings { Swap = s.X % 2 == 1, SoftDirty = s.X % 4 >= 2, Thp = (ThpMode)(s.J % 5) },
                    }, deadline: deadline, cancellationToken: ct);
                    return null;
                case K.DestroyMachine:
                    if (s.J % 4 != 0)
                        return null; // rare: a destroyed machine ends most of the sequence's interest
                    await c.Machines.DestroyMachineAsync(new DestroyMachineRequest { MachineId = Machine(s) }, deadline: deadline, cancellationToken: ct);
                    return null;
                case K.Kpageflags:
                    var kp = new KpageflagsRequest { MachineId = Machine(s) };
                    kp.Pfns.Add([s.X, s.X >> 20, 0x1000 + (s.Y % 4096), ulong.MaxValue]);
                    await c.Machines.KpageflagsAsync(kp, deadline: deadline, cancellationToken: ct);
                    return null;
                case K.CreateMm:
                    Add(_mms, (await c.Mm.CreateMmAsync(new CreateMmRequest { MachineId = Machine(s) }, deadline: deadline, cancellationToken: ct)).Mm.MmId);
                    return null;
                case K.GetMm:
                    await c.Mm.GetMmAsync(new GetMmRequest { MmId = Mm(s) }, deadline: deadline, cancellationToken: ct);
                    return null;
                case K.ListMms:
                    await c.Mm.ListMmsAsync(new ListMmsRequest { MachineId = Machine(s), PageSize = (int)s.Y }, deadline: deadline, cancellationToken: ct);
                    return null;
                case K.DestroyMm:
                    if (s.J % 4 != 0)
                        return null;
                    await c.Mm.DestroyMmAsync(new DestroyMmRequest { MmId = Mm(s) }, deadline: deadline, cancellationToken: ct);
                    return null;
                case K.Mmap:
                    {
                        var len = s.Len;
                        var addr = s.Addr;
                        // Capped: a successful mapping is at most MaxMapBytes, so no later request
                        // meets a huge VMA; a huge length is still sent, where it must fail.
                        if (len > MaxMapBytes && len <= TaskSize)
                            addr = TaskSize - Pg;
                        return (await c.Mm.MmapAsync(new MmapRequest
                        {
                            MmId = Mm(s),
                            Addr = addr,
                            Len = len,
                            Prot = Prot(s),
                            Shared = s.J % 3 == 1,
                            FileId = s.J % 5 == 2 ? File(s) : 0,
                            Offset = s.J % 5 == 2 ? (s.Addr2 - Base) % (1UL << 20) : 0,
                            ReadOnlyFd = s.J % 11 == 3,
                            Populate = s.Y % 5 == 1,
                        }, deadline: deadline, cancellationToken: ct)).Errno;
                    }
                case K.Mprotect:
                    return (await c.Mm.MprotectAsync(new MprotectRequest { MmId = Mm(s), Start = s.Addr, Len = s.Len, Prot = Prot(s) }, deadline: deadline, cancellationToken: ct)).Errno;
                case K.ClearRefs:
                    return (await c.Mm.ClearRefsAsync(new ClearRefsRequest { MmId = Mm(s), Value = (s.Y % 7).ToString(System.Globalization.CultureInfo.InvariantCulture) }, deadline: deadline, cancellationToken: ct)).Errno;
                case K.Munmap:
                    return (await c.Mm.MunmapAsync(new MunmapRequest { MmId = Mm(s), ThreadId = OptThread(s), Start = s.Addr, Len = s.Len }, deadline: deadline, cancellationToken: ct)).Errno;
                case K.Mremap:
                    return (await c.Mm.MremapAsync(new MremapRequest { MmId = Mm(s), ThreadId = OptThread(s), OldAddr = s.Addr, Len = s.Len, NewAddr = s.Addr2 }, deadline: deadline, cancellationToken: ct)).Errno;
                case K.Madvise:
                    return (await c.Mm.MadviseAsync(new MadviseRequest { MmId = Mm(s), ThreadId = OptThread(s), Start = s.Addr, Len = s.Len, Advice = Advice(s) }, deadline: deadline, cancellationToken: ct)).Errno;
                case K.Fork:
                    {
                        var r = await c.Mm.ForkAsync(new ForkRequest { MmId = Mm(s), ThreadId = OptThread(s) }, deadline: deadline, cancellationToken: ct);
                        Add(_mms, r.ChildMmId);
                        Add(_threads, r.ChildThreadId);
                        return r.Errno;
                    }
                case K.ProcessVmReadv:
                    {
                        var rq = new ProcessVmReadvRequest { MmId = Mm(s), ThreadId = OptThread(s), RemoteMmId = Mm2(s), Flags = s.X % 7 == 0 ? 1UL : 0 };
                        rq.LocalIov.Add(Iovs(s, s.Addr, (int)(s.X % 3)));
                        rq.RemoteIov.Add(Iovs(s, s.Addr2, (int)((s.X >> 2) % 3)));
                        return (await c.Mm.ProcessVmReadvAsync(rq, deadline: deadline, cancellationToken: ct)).Errno;
                    }
                case K.ProcessVmWritev:
                    {
                        var rq = new ProcessVmWritevRequest { MmId = Mm(s), ThreadId = OptThread(s), RemoteMmId = Mm2(s), Flags = s.X % 7 == 0 ? 1UL : 0 };
                        rq.LocalIov.Add(Iovs(s, s.Addr, (int)(s.X % 3)));
                        rq.RemoteIov.Add(Iovs(s, s.Addr2, (int)((s.X >> 2) % 3)));
                        return (await c.Mm.ProcessVmWritevAsync(rq, deadline: deadline, cancellationToken: ct)).Errno;
                    }
                case K.CreateFile:
                    {
                        var size = s.Y % 4 == 3 ? s.Len : s.Len % (4UL << 20);
                        var f = await c.Mm.CreateFileAsync(new CreateFileRequest { MachineId = Machine(s), Name = "f" + s.Y, Shmem = s.X % 3 != 0, Size = size }, deadline: deadline, cancellationToken: ct);
                        Add(_files, f.File.FileId);
                        return null;
                    }
                case K.ListVmas:
                    await c.Mm.ListVmasAsync(new ListVmasRequest { MmId = Mm(s), PageSize = (int)s.Y }, deadline: deadline, cancellationToken: ct);
                    return null;
                case K.DumpPageTable:
                    await c.Mm.DumpPageTableAsync(new DumpPageTableRequest { MmId = Mm(s), Start = s.Addr, Len = s.Len }, deadline: deadline, cancellationToken: ct);
                    return null;
                case K.Pagemap:
                    await c.Mm.PagemapAsync(new PagemapRequest { MmId = Mm(s), Start = s.Addr, Pages = s.Y % 4 == 3 ? (uint)s.X : (uint)(s.Len / Pg % 4097) }, deadline: deadline, cancellationToken: ct);
                    return null;
                case K.Smaps:
                    await c.Mm.SmapsAsync(new SmapsRequest { MmId = Mm(s), Start = s.Addr, End = s.J % 2 == 0 ? s.Addr + s.Len : s.Addr2 }, deadline: deadline, cancellationToken: ct);
                    return null;
                case K.PagemapScan:
                    return (await c.Mm.PagemapScanAsync(new PagemapScanRequest
                    {
                        MmId = Mm(s),
                        Flags = s.X & 3,
                        Start = s.Addr,
                        End = s.J % 2 == 0 ? s.Addr + s.Len : s.Addr2,
                        VecLen = s.Y % 4 == 3 ? s.X : s.Y,
                        MaxPages = s.J % 3 == 0 ? 0 : s.Len / Pg,
                        CategoryInverted = (s.X >> 4) & 0xff,
                        CategoryMask = (s.X >> 12) & 0xff,
                        CategoryAnyofMask = (s.X >> 20) & 0xff,
                        ReturnMask = s.J % 5 == 0 ? 0UL : 0xffUL,
                    }, deadline: deadline, cancellationToken: ct)).Errno;
                case K.Digest:
                    await c.Mm.DigestAsync(new DigestRequest { MmId = Mm(s), Start = s.Addr, Pages = s.Y % 4 == 3 ? (uint)s.X : (uint)(s.Len / Pg % 4097) }, deadline: deadline, cancellationToken: ct);
                    return null;
                case K.CreateThread:
                    Add(_threads, (await c.Threads.CreateThreadAsync(new CreateThreadRequest { MmId = Mm(s) }, deadline: deadline, cancellationToken: ct)).Thread.ThreadId);
                    return null;
                case K.GetThread:
                    await c.Threads.GetThreadAsync(new GetThreadRequest { ThreadId = Thread(s) }, deadline: deadline, cancellationToken: ct);
                    return null;
                case K.ListThreads:
                    await c.Threads.ListThreadsAsync(new ListThreadsRequest { MmId = Mm(s), PageSize = (int)s.Y }, deadline: deadline, cancellationToken: ct);
                    return null;
                case K.AccessTouch:
                    {
                        var pages = s.Y % 4 == 3 ? (uint)s.X : (uint)(s.Len / Pg % 4097);
                        var r = await c.Threads.AccessAsync(new AccessRequest
                        {
                            ThreadId = Thread(s),
                            Access = new AccessOp { Addr = s.Addr, Write = s.X % 2 == 1, Origin = (AccessOrigin)(s.J % 4), Touch = new TouchPattern { Pages = pages, Value = (uint)(s.X >> 8) } },
                        }, deadline: deadline, cancellationToken: ct);
                        return r.Result.Errno;
                    }
                case K.AccessSpan:
                    {
                        var a = new AccessOp { Addr = s.Addr, Origin = (AccessOrigin)(s.J % 4) };
                        if (s.X % 2 == 1)
                        {
                            a.Write = true;
                            a.Span = new ByteSpan { Data = ByteString.CopyFrom(Bytes(s.X, s.Len % 9000)), Length = s.Y % 6 == 5 ? s.Len : 0 };
                        }
                        else
                        {
                            a.Span = new ByteSpan { Length = s.Y % 6 == 5 ? s.Len : s.Len % 70000 };
                        }
                        var r = await c.Threads.AccessAsync(new AccessRequest { ThreadId = Thread(s), Access = a }, deadline: deadline, cancellationToken: ct);
                        return r.Result.Errno;
                    }
                case K.StartOp:
                    {
                        var r = await c.Threads.StartOpAsync(new StartOpRequest { ThreadId = Thread(s), Op = MakeOp(s) }, deadline: deadline, cancellationToken: ct);
                        Add(_ops, r.OpId);
                        return null;
                    }
                case K.WaitOp:
                    {
                        var r = await c.Threads.WaitOpAsync(new WaitOpRequest { OpId = PickFrom(_ops, s.I, s.X, _threads) }, deadline: deadline, cancellationToken: ct);
                        Add(_mms, r.Result.ChildMmId);
                        Add(_threads, r.Result.ChildThreadId);
                        return r.Result.Errno;
                    }
                case K.TakeCompletions:
                    {
                        var r = await c.Threads.TakeCompletionsAsync(new TakeCompletionsRequest { MachineId = Machine(s) }, deadline: deadline, cancellationToken: ct);
                        foreach (var x in r.Results)
                        {
                            Add(_mms, x.ChildMmId);
                            Add(_threads, x.ChildThreadId);
                        }
                        return null;
                    }
                case K.Userfaultfd:
                    {
                        uint[] flags = [0x800, 0x800, 0, 0x80800, 1 | 0x800, (uint)s.X];
                        var r = await c.Uffd.UserfaultfdAsync(new UserfaultfdRequest { MmId = Mm(s), Flags = flags[s.Y % 6] }, deadline: deadline, cancellationToken: ct);
                        Add(_uffds, r.UffdId);
                        // Most contexts get their handshake at once, so the ioctls get past EINVAL.
                        if (r.UffdId != 0 && s.J % 4 != 0)
                            await c.Uffd.UffdioApiAsync(new UffdioApiRequest { UffdId = r.UffdId, Api = 0xAA, Features = s.J % 4 == 1 ? 0 : s.X & 0x1ffff }, deadline: deadline, cancellationToken: ct);
                        return r.Errno;
                    }
                case K.Api:
                    return (await c.Uffd.UffdioApiAsync(new UffdioApiRequest { UffdId = Uffd(s), Api = s.J % 5 == 0 ? s.X : 0xAA, Features = s.J % 3 == 0 ? s.X : s.X & 0x1ffff }, deadline: deadline, cancellationToken: ct)).Errno;
                case K.Register:
                    return (await c.Uffd.UffdioRegisterAsync(new UffdioRegisterRequest { UffdId = Uffd(s), Start = s.Addr, Len = s.Len, Mode = s.Y % 8 == 7 ? s.X : (s.X & 7) | (s.X % 5 == 0 ? 0 : 1UL) }, deadline: deadline, cancellationToken: ct)).Errno;
                case K.Unregister:
                    return (await c.Uffd.UffdioUnregisterAsync(new UffdioUnregisterRequest { UffdId = Uffd(s), Start = s.Addr, Len = s.Len }, deadline: deadline, cancellationToken: ct)).Errno;
                case K.Wake:
                    return (await c.Uffd.UffdioWakeAsync(new UffdioWakeRequest { UffdId = Uffd(s), Start = s.Addr, Len = s.Len }, deadline: deadline, cancellationToken: ct)).Errno;
                case K.Writeprotect:
                    return (await c.Uffd.UffdioWriteprotectAsync(new UffdioWriteprotectRequest { UffdId = Uffd(s), Start = s.Addr, Len = s.Len, Mode = Mode(s) }, deadline: deadline, cancellationToken: ct)).Errno;
                case K.Copy:
                    {
                        var rq = new UffdioCopyRequest { UffdId = Uffd(s), Dst = s.Addr, Src = s.Addr2, Len = s.Len, Mode = Mode(s) };
                        if (s.Y % 3 == 0)
                            rq.Data = ByteString.CopyFrom(Bytes(s.X, s.Len));
                        else if (s.Y % 3 == 1)
                            rq.Fill = (uint)(s.X >> 3);
                        return (await c.Uffd.UffdioCopyAsync(rq, deadline: deadline, cancellationToken: ct)).Errno;
                    }
                case K.Zeropage:
                    return (await c.Uffd.UffdioZeropageAsync(new UffdioZeropageRequest { UffdId = Uffd(s), Start = s.Addr, Len = s.Len, Mode = Mode(s) }, deadline: deadline, cancellationToken: ct)).Errno;
                case K.Continue:
                    return (await c.Uffd.UffdioContinueAsync(new UffdioContinueRequest { UffdId = Uffd(s), Start = s.Addr, Len = s.Len, Mode = Mode(s) }, deadline: deadline, cancellationToken: ct)).Errno;
                case K.Poison:
                    return (await c.Uffd.UffdioPoisonAsync(new UffdioPoisonRequest { UffdId = Uffd(s), Start = s.Addr, Len = s.Len, Mode = Mode(s) }, deadline: deadline, cancellationToken: ct)).Errno;
                case K.Move:
                    return (await c.Uffd.UffdioMoveAsync(new UffdioMoveRequest { UffdId = Uffd(s), Dst = s.Addr, Src = s.Addr2, Len = s.Len, Mode = Mode(s), CallerMmId = s.J % 3 == 0 ? 0 : Mm2(s) }, deadline: deadline, cancellationToken: ct)).Errno;
                case K.Poll:
                    await c.Uffd.PollAsync(new PollRequest { UffdId = Uffd(s), TimeoutMs = s.Y % 4 == 3 ? (int)s.X : (int)(s.Y % 3) - 1 }, deadline: deadline, cancellationToken: ct);
                    return null;
                case K.Read:
                    return (await c.Uffd.ReadAsync(new ReadRequest { UffdId = Uffd(s) }, deadline: deadline, cancellationToken: ct)).Errno;
                case K.Close:
                    return (await c.Uffd.CloseAsync(new CloseRequest { UffdId = Uffd(s) }, deadline: deadline, cancellationToken: ct)).Errno;
                case K.ReadEvents:
                    {
                        using var call = c.Uffd.ReadEvents(new ReadEventsRequest { UffdId = Uffd(s) }, deadline: deadline, cancellationToken: ct);
                        while (await call.ResponseStream.MoveNext(CancellationToken.None))
                            Add(_uffds, call.ResponseStream.Current.Msg.Fork?.UffdId ?? 0);
                        return null;
                    }
                case K.Serve:
                    {
                        using var call = c.Uffd.Serve(deadline: deadline, cancellationToken: ct);
                        var rq = new ServeRequest { UffdId = Uffd(s), MaxMessages = s.Y % 4 == 3 ? (uint)s.X : s.Y % 4 };
                        for (var k = 0; k < (int)(s.X % 4); k++)
                        {
                            var a = s.Addr + ((ulong)k * Pg);
                            var res = new Resolution { Tag = (ulong)k };
                            switch ((s.X >> (2 + k)) % 7)
                            {
                                case 0: res.UffdioCopy = new UffdioCopyRequest { Dst = a, Len = Pg, Fill = (uint)k + 1 }; break;
                                case 1: res.UffdioZeropage = new UffdioZeropageRequest { Start = a, Len = s.Len }; break;
                                case 2: res.UffdioWriteprotect = new UffdioWriteprotectRequest { Start = a, Len = Pg, Mode = s.X & 3 }; break;
                                case 3: res.UffdioContinue = new UffdioContinueRequest { Start = a, Len = Pg }; break;
                                case 4: res.UffdioMove = new UffdioMoveRequest { Dst = a, Src = s.Addr2, Len = Pg, Mode = 2 }; break;
                                case 5: res.UffdioWake = new UffdioWakeRequest { Start = a, Len = s.Len }; break;
                                default: break; // a resolution with no op
                            }
                            rq.Resolutions.Add(res);
                        }
                        await call.RequestStream.WriteAsync(rq, ct);
                        if (s.J % 2 == 0)
                            await call.RequestStream.CompleteAsync();
                        while (await call.ResponseStream.MoveNext(CancellationToken.None))
                        {
                            foreach (var m in call.ResponseStream.Current.Messages)
                                Add(_uffds, m.Fork?.UffdId ?? 0);
                        }
                        return null;
                    }
                default:
                    throw new UnreachableException(s.Kind.ToString());
            }
        }
    }
}
