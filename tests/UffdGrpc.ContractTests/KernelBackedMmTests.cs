using UffdGrpc.Server.Hosting.Kernel;
using Xunit.Abstractions;

namespace UffdGrpc.ContractTests;

/// <summary>A server with the kernel backend on and small kernel limits.</summary>
public sealed class KernelBackendFixture : GrpcTestFixture
{
    protected override IReadOnlyDictionary<string, string?> Settings { get; } = new Dictionary<string, string?>
    {
        ["KernelBackend:Enabled"] = "true",
        ["Limits:KernelHelpersPerServer"] = "3",
        ["Limits:KernelMmBytes"] = (1 << 20).ToString(System.Globalization.CultureInfo.InvariantCulture),
    };

    /// <summary>Skips the test, printing the reason, where this host cannot run the kernel backend.</summary>
    public static void SkipUnlessHostCanRun(ITestOutputHelper output)
    {
        var why = KernelBackend.HostUnavailable();
        if (why is not null)
            output.WriteLine("skipped: " + why);
        Skip.If(why is not null, why);
    }
}

/// <summary>A server as configured by default: the kernel backend is off.</summary>
public sealed class KernelBackendOffFixture : GrpcTestFixture;

/// <summary>
/// Kernel-backed address spaces (CreateMm with MM_BACKEND_KERNEL) through the server: real
/// memory in a helper process, real userfaults served by handler streams, the same errnos and
/// fields as the model, and the refusals. Skipped, with the reason, where the host cannot run
/// the backend (no userfaultfd for the server's user, no gcc).
/// </summary>
[Collection("kernel-backend")]
public sealed class KernelBackedMmTests(KernelBackendFixture fx, ITestOutputHelper output) : IClassFixture<KernelBackendFixture>
{
    /// <summary>Far below the helper's own mappings (its PIE binary and libraries lie near 0x55.. and 0x7f..).</summary>
    private const ulong X = 0x1000_0000_0000;
    private const ulong Wp = 1, Missing = 1;
    private const ulong FeatureWp = 1UL << 0;
    private const uint Rw = 3;
    private static readonly TimeSpan s_wait = TimeSpan.FromSeconds(20);

    private void SkipUnlessHostCanRun() => KernelBackendFixture.SkipUnlessHostCanRun(output);

    private static Task<AccessResponse> AccessCall(UffdClient c, long thread, AccessOp op, CancellationToken ct = default) =>
        c.Threads.AccessAsync(new AccessRequest { ThreadId = thread, Access = op }, cancellationToken: ct).ResponseAsync;

    [SkippableFact]
    public async Task A_write_to_a_write_protected_page_sleeps_in_the_kernel_until_a_ReadEvents_handler_unprotects_it()
    {
        SkipUnlessHostCanRun();
        await fx.InMachineAsync(async (c, m) =>
        {
            var mm = await c.CreateMmAsync(m, MmBackend.Kernel);
            Assert.Equal(MmBackend.Kernel, (await c.Mm.GetMmAsync(new GetMmRequest { MmId = mm })).Mm.Backend);
            Assert.True((await c.MmapAsync(mm, X, Page, Rw)).IsOk());
            var t = await c.CreateThreadAsync(mm);
            Assert.True(t.Tid > 0);
            Assert.Equal(SignalCode.Unspecified, (await c.WriteAsync(t.ThreadId, X, 0x11)).Signal);
            var (e, u) = await c.CreateUffdAsync(mm);
            Assert.True(e.IsOk());
            var api = await c.ApiAsync(u, FeatureWp);
            Assert.True(api.Errno.IsOk());
            Assert.NotEqual(0UL, api.Features & FeatureWp);
            Assert.True((await c.RegisterAsync(u, X, Page, 2)).Errno.IsOk());
            Assert.True((await c.WriteprotectAsync(u, X, Page, Wp)).IsOk());
            Assert.True((await c.PagemapAsync(mm, X, 1))[0].UffdWp);

            using var cts = new CancellationTokenSource(s_wait);
            await using var events = c.ReadEventsAsync(u, cts.Token).GetAsyncEnumerator(cts.Token);
            var write = AccessCall(c, t.ThreadId, UffdClient.Touch(X, write: true, value: 0x22));
            Assert.True(await events.MoveNextAsync());
            var pf = events.Current.Pagefault;
            Assert.Equal(UffdEvent.Pagefault, events.Current.Event);
            Assert.Equal(X, pf.Address);
            Assert.True(pf.Write && pf.Wp);
            Assert.Equal(3UL, pf.Flags);
            Assert.False(write.IsCompleted);
            // The kernel queues the message just before the thread goes to sleep.
            await EventuallyAsync(async () => (await c.GetThreadAsync(t.ThreadId)).State == ThreadState.BlockedInUserfault, "the writer sleeps in handle_userfault");
            Assert.True((await c.WriteprotectAsync(u, X, Page, 0)).IsOk());
            var r = (await write.WaitAsync(s_wait)).Result;
            Assert.False(r.Aborted);
            Assert.Equal(SignalCode.Unspecified, r.Signal);
            Assert.Equal(1u, r.Done);
            Assert.Equal(0x22, (await c.ReadAsync(t.ThreadId, X)).Values[0]);
            Assert.False((await c.PagemapAsync(mm, X, 1))[0].UffdWp);
        });
    }

    [SkippableFact]
    public async Task A_missing_fault_is_resolved_by_UFFDIO_COPY_through_Serve_with_the_kernel_s_copy_field()
    {
        SkipUnlessHostCanRun();
        await fx.InMachineAsync(async (c, m) =>
        {
            var mm = await c.CreateMmAsync(m, MmBackend.Kernel);
            Assert.True((await c.MmapAsync(mm, X, 2 * Page, Rw)).IsOk());
            var t = await c.CreateThreadAsync(mm);
            var (_, u) = await c.CreateUffdAsync(mm);
            Assert.True((await c.ApiAsync(u)).Errno.IsOk());
            Assert.True((await c.RegisterAsync(u, X, 2 * Page, Missing)).Errno.IsOk());
            using var cts = new CancellationTokenSource(s_wait);
            await using var serve = await c.ServeAsync(u, ct: cts.Token);
            var read = AccessCall(c, t.ThreadId, UffdClient.Touch(X + Page + 5, write: false));
            var batch = await serve.Messages.ReadAsync(cts.Token);
            var msg = Assert.Single(batch);
            Assert.Equal(X + Page, msg.Pagefault.Address);
            Assert.Equal(0UL, msg.Pagefault.Flags);
            var data = Enumerable.Range(0, (int)Page).Select(i => (byte)(i * 7)).ToArray();
            var results = await serve.ResolveAsync([ServeSession.Copy(X + Page, data, tag: 9)], cts.Token);
            var res = Assert.Single(results);
            Assert.Equal(9UL, res.Tag);
            Assert.True(res.Errno.IsOk());
            Assert.Equal((long)Page, res.Field);
            var r = (await read.WaitAsync(s_wait)).Result;
            Assert.Equal(data[5], r.Values[0]);
            // The page is there now: a second copy is EEXIST, with -EEXIST in the field.
            var again = await c.CopyAsync(u, X + Page, data);
            Assert.Equal(Errno.Eexist, again.Errno);
            Assert.Equal(-17, again.Field);
        });
    }

    [SkippableFact]
    public async Task StartOp_results_come_from_WaitOp_or_TakeCompletions()
    {
        SkipUnlessHostCanRun();
        await fx.InMachineAsync(async (c, m) =>
        {
            var mm = await c.CreateMmAsync(m, MmBackend.Kernel);
            Assert.True((await c.MmapAsync(mm, X, 2 * Page, Rw)).IsOk());
            var t = (await c.CreateThreadAsync(mm)).ThreadId;
            // A blocking uffd: the real thread faults after StartOp returns, and read waits for its message.
            var (_, u) = await c.CreateUffdAsync(mm, flags: 0x80000);
            Assert.True((await c.ApiAsync(u)).Errno.IsOk());
            Assert.True((await c.RegisterAsync(u, X, Page, Missing)).Errno.IsOk());
            // An access asleep in a userfault: started, busy, then woken by a ZEROPAGE.
            var started = await c.StartOpAsync(t, new ThreadOp { Access = UffdClient.Touch(X + 1, write: true, value: 5) });
            var (_, msg) = await c.ReadMessageAsync(u);
            Assert.Equal(X, msg!.Pagefault.Address);
            var busy = await Assert.ThrowsAsync<RpcException>(() => c.StartOpAsync(t, new ThreadOp { Access = UffdClient.Touch(X, write: false) }));
            Assert.Equal(StatusCode.FailedPrecondition, busy.StatusCode);
            Assert.Equal(started.OpId, (await c.GetThreadAsync(t)).OpId);
            Assert.True((await c.ZeropageAsync(u, X, Page)).Errno.IsOk());
            var waited = await c.WaitOpAsync(started.OpId).WaitAsync(s_wait);
            Assert.Equal(started.OpId, waited.OpId);
            Assert.Equal(1u, waited.Done);
            // A second one, drained by TakeCompletions (and then forgotten).
            var second = await c.StartOpAsync(t, new ThreadOp { Access = UffdClient.Touch(X + Page, write: false) });
            using var cts = new CancellationTokenSource(s_wait);
            var drained = new List<ThreadOpResult>();
            while (drained.Count == 0)
            {
                drained.AddRange(await c.TakeCompletionsAsync(m, cts.Token));
                await Task.Delay(10, cts.Token);
            }
            var r = Assert.Single(drained);
            Assert.Equal(second.OpId, r.OpId);
            Assert.Equal(1u, r.Done);
            var gone = await Assert.ThrowsAsync<RpcException>(() => c.WaitOpAsync(second.OpId));
            Assert.Equal(StatusCode.NotFound, gone.StatusCode);
        });
    }

    /// <summary>One sequence of calls, printed one line per outcome (errnos, result fields, pagemap bits, event fields).</summary>
    private static async Task<List<string>> SequenceAsync(UffdClient c, long mm)
    {
        var log = new List<string>();
        string Pm(IReadOnlyList<PagemapEntry> es) => string.Join(' ', es.Select(p => $"{(p.Present ? 'P' : '-')}{(p.UffdWp ? 'W' : '-')}{(p.Exclusive ? 'X' : '-')}"));
        string Res(ThreadOpResult r) => $"aborted={r.Aborted} signal={r.Signal} done={r.Done} values={Convert.ToHexString(r.Values.Span)}";
        string Msg(UffdMsg? m) => m is null ? "none" : $"{m.Event} flags={m.Pagefault?.Flags} addr=0x{m.Pagefault?.Address:x}";
        log.Add("mmap " + await c.MmapAsync(mm, X, 4 * Page, Rw));
        log.Add("mmap again " + await c.MmapAsync(mm, X, Page, Rw));
        log.Add("mmap unaligned " + await c.MmapAsync(mm, X + 8 * Page + 1, Page, Rw));
        var t = (await c.CreateThreadAsync(mm)).ThreadId;
        log.Add("write p0 " + Res(await c.WriteAsync(t, X, 7)));
        log.Add("read p1 " + Res(await c.ReadAsync(t, X + Page)));
        log.Add("pagemap " + Pm(await c.PagemapAsync(mm, X, 4)));
        var (e, u) = await c.CreateUffdAsync(mm, flags: 0x80000);
        log.Add("userfaultfd " + e);
        log.Add("userfaultfd bad flags " + (await c.CreateUffdAsync(mm, flags: 0x40)).Errno);
        log.Add("register before api " + (await c.RegisterAsync(u, X, Page, Missing)).Errno);
        var api = await c.ApiAsync(u, FeatureWp);
        log.Add($"api {api.Errno} features=0x{api.Features:x} ioctls=0x{api.Ioctls:x}");
        log.Add("api again " + (await c.ApiAsync(u, FeatureWp)).Errno);
        log.Add("register unaligned " + (await c.RegisterAsync(u, X + 1, Page, Missing)).Errno);
        log.Add("register no mode " + (await c.RegisterAsync(u, X, Page, 0)).Errno);
        log.Add("register hole " + (await c.RegisterAsync(u, X, 8 * Page, Missing)).Errno);
        var reg = await c.RegisterAsync(u, X, 4 * Page, Missing | 2);
        log.Add($"register {reg.Errno} ioctls=0x{reg.Ioctls:x}");
        var page = new byte[Page];
        page.AsSpan().Fill(0x5a);
        log.Add("copy p0 " + await c.CopyAsync(u, X, page));
        log.Add("copy unaligned " + await c.CopyAsync(u, X + 1, page));
        log.Add("copy p2 " + await c.CopyAsync(u, X + (2 * Page), page));
        log.Add("zeropage p3 " + await c.ZeropageAsync(u, X + (3 * Page), Page));
        log.Add("writeprotect " + await c.WriteprotectAsync(u, X, 3 * Page, Wp));
        log.Add("pagemap " + Pm(await c.PagemapAsync(mm, X, 4)));
        var write = AccessCall(c, t, UffdClient.Touch(X + (2 * Page) + 3, write: true, value: 9));
        var (re, msg) = await c.ReadMessageAsync(u);
        log.Add($"read {re} {Msg(msg)}");
        log.Add("unprotect p2 " + await c.WriteprotectAsync(u, X + (2 * Page), Page, 0));
        log.Add("write p2 " + Res((await write.WaitAsync(s_wait)).Result));
        log.Add("pagemap " + Pm(await c.PagemapAsync(mm, X, 4)));
        log.Add("wake " + await c.WakeAsync(u, X, Page));
        log.Add("continue " + await c.ContinueAsync(u, X + (3 * Page), Page));
        log.Add("poison present " + await c.PoisonAsync(u, X + Page, Page));
        log.Add("move without the feature " + await c.MoveAsync(u, X + (3 * Page), X + (2 * Page), Page));
        var resolve = await c.Uffd.ResolveAsync(new ResolveRequest { UffdId = u, Resolutions = { ServeSession.Wake(X, tag: 1), ServeSession.Zeropage(X + Page, tag: 2) } });
        log.Add("resolve " + string.Join(' ', resolve.Results.Select(r => $"{r.Tag}:{r.Errno}:{r.Field}")));
        log.Add("unregister " + await c.UnregisterAsync(u, X + (3 * Page), Page));
        log.Add("copy unregistered " + await c.CopyAsync(u, X + (3 * Page), page));
        log.Add("zeropage unregistered " + await c.ZeropageAsync(u, X + (3 * Page), Page));
        log.Add("mprotect ro " + await c.MprotectAsync(mm, X, Page, 1));
        log.Add("write ro " + Res(await c.WriteAsync(t, X, 1)));
        log.Add("madvise dontneed " + await c.MadviseAsync(mm, X + (3 * Page), Page, 4));
        log.Add("pagemap " + Pm(await c.PagemapAsync(mm, X, 4)));
        log.Add("close " + await c.CloseUffdAsync(u));
        log.Add("close again " + await c.CloseUffdAsync(u));
        log.Add("api closed " + (await c.ApiAsync(u)).Errno);
        var (_, nb) = await c.CreateUffdAsync(mm);
        log.Add("read nonblocking " + (await c.ReadMessageAsync(nb)).Errno);
        log.Add("munmap " + await c.MunmapAsync(mm, X, 4 * Page));
        log.Add("read unmapped " + Res(await c.ReadAsync(t, X)));
        return log;
    }

    [SkippableFact]
    public async Task The_same_calls_give_the_same_errnos_fields_pagemap_bits_and_events_on_the_model_and_on_the_kernel()
    {
        SkipUnlessHostCanRun();
        var c = fx.NewClient();
        // This host boots pvm_no_zero_page=1: a read fault on empty anonymous memory allocates.
        var zeroPage = File.Exists("/proc/cmdline") && File.ReadAllText("/proc/cmdline").Contains("pvm_no_zero_page=1", StringComparison.Ordinal) ? false : true;
        var machine = await c.Machines.CreateMachineAsync(new CreateMachineRequest { Settings = new MachineSettings { ReadFaultZeroPage = zeroPage } });
        var m = machine.Machine.MachineId;
        try
        {
            var model = await SequenceAsync(c, await c.CreateMmAsync(m, MmBackend.Model));
            var kernel = await SequenceAsync(c, await c.CreateMmAsync(m, MmBackend.Kernel));
            for (var i = 0; i < model.Count; i++)
                output.WriteLine($"{(model[i] == kernel[i] ? "  " : "!=")} model: {model[i]}{(model[i] == kernel[i] ? "" : "\n   kernel: " + kernel[i])}");
            Assert.Equal(model, kernel);
        }
        finally
        {
            await c.DestroyMachineAsync(m);
        }
        Assert.Empty(fx.Errors);
    }
}
