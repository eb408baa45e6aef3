using System.Diagnostics;
using Microsoft.AspNetCore.Hosting;
using Microsoft.Extensions.Logging;

namespace UffdGrpc.ContractTests;

/// <summary>
/// The meter's counters run alone: every server of this test process reports into the same
/// meter name, so no other test may fault while these measure exact increments.
/// </summary>
[CollectionDefinition(nameof(MetricsCollection), DisableParallelization = true)]
public sealed class MetricsCollection;

/// <summary>The Prometheus scrape endpoint and the RPC activities, against the model's own events.</summary>
[Collection(nameof(MetricsCollection))]
public sealed class MetricsTests(GrpcTestFixture fx) : IClassFixture<GrpcTestFixture>
{
    private async Task<PrometheusText> ScrapeAsync()
    {
        using var http = fx.CreateClient();
        var r = await http.GetAsync(new Uri("/metrics", UriKind.Relative));
        r.EnsureSuccessStatusCode();
        return new PrometheusText(await r.Content.ReadAsStringAsync());
    }

    /// <summary>Records every activity of the server's source, all data requested, as it stops.</summary>
    private static ActivityListener ListenToServerActivities(System.Collections.Concurrent.ConcurrentQueue<Activity> seen)
    {
        var listener = new ActivityListener
        {
            ShouldListenTo = source => source.Name == "UffdGrpc.Server",
            Sample = (ref ActivityCreationOptions<ActivityContext> _) => ActivitySamplingResult.AllDataAndRecorded,
            ActivityStopped = seen.Enqueue,
        };
        ActivitySource.AddActivityListener(listener);
        return listener;
    }

    /// <summary>Starts an access that sleeps in a userfault and waits until it does.</summary>
    private static async Task<Task<ThreadOpResult>> SleepInUserfaultAsync(UffdClient c, long thread, Func<Task<ThreadOpResult>> access)
    {
        var t = access();
        await EventuallyAsync(async () => (await c.GetThreadAsync(thread)).State == ThreadState.BlockedInUserfault, "the access sleeps in a userfault");
        return t;
    }

    [Fact]
    public async Task Faults_move_the_counters_and_the_latency_histogram_by_exactly_what_happened()
    {
        // Arrange: 3 pages registered MISSING|WP; the uffd is O_NONBLOCK, so Read returns at once.
        var c = fx.NewClient();
        await using var s = await Sandbox.CreateAsync(c, pages: 3, registerMode: 3);
        var before = await ScrapeAsync();

        // Act: two MISSING faults read by the handler and resolved by UFFDIO_COPY,
        for (var i = 0UL; i < 2; i++)
        {
            var read = await SleepInUserfaultAsync(c, s.Thread, () => c.ReadAsync(s.Thread, A + i * Page));
            Assert.True((await c.ReadMessageAsync(s.Uffd)).Message?.Pagefault is { Wp: false });
            Assert.Equal(Errno.Unspecified, (await c.CopyFillAsync(s.Uffd, A + i * Page, 0x7f00_0000_0000, 0x5a, Page)).Errno);
            Assert.Equal("ok", (await read).Errno.Name());
        }
        // one MISSING fault resolved by UFFDIO_ZEROPAGE before any handler read it,
        var unread = await SleepInUserfaultAsync(c, s.Thread, () => c.ReadAsync(s.Thread, A + 2 * Page));
        var asleep = await ScrapeAsync();
        Assert.Equal(Errno.Unspecified, (await c.ZeropageAsync(s.Uffd, A + 2 * Page, Page)).Errno);
        Assert.Equal("ok", (await unread).Errno.Name());
        // one WP fault read and resolved by un-protecting,
        Assert.Equal(Errno.Unspecified, await c.WriteprotectAsync(s.Uffd, A, Page, 1));
        var write = await SleepInUserfaultAsync(c, s.Thread, () => c.WriteAsync(s.Thread, A, 0x11));
        Assert.True((await c.ReadMessageAsync(s.Uffd)).Message?.Pagefault is { Wp: true });
        Assert.Equal(Errno.Unspecified, await c.WriteprotectAsync(s.Uffd, A, Page, 0));
        Assert.Equal("ok", (await write).Errno.Name());
        // one injection firing and one refused call.
        await c.Injection.AddRuleAsync(new AddRuleRequest { MachineId = s.Machine, Rule = new InjectRule { Site = InjectSite.MmapChanging, UffdId = s.Uffd, MaxFirings = 1 } });
        Assert.Equal(Errno.Eagain, await c.WriteprotectAsync(s.Uffd, A, Page, 1));
        await Assert.ThrowsAsync<RpcException>(() => c.GetThreadAsync(long.MaxValue));
        // and one call with a token this server does not know (the telemetry stage runs
        // outside authentication, so the refusal is counted with the status its client got).
        using (var stranger = new UffdClient(fx.CreateChannel("not-a-token-of-this-server")))
            Assert.Equal(StatusCode.Unauthenticated, (await Assert.ThrowsAsync<RpcException>(() => stranger.CreateMachineAsync())).StatusCode);
        var after = await ScrapeAsync();

        // Assert
        double Delta(string name, params (string, string)[] labels) => after.Sum(name, labels) - before.Sum(name, labels);
        Assert.Equal(3, Delta("uffdgrpc_userfaults_raised_total", ("class", "missing")));
        Assert.Equal(1, Delta("uffdgrpc_userfaults_raised_total", ("class", "wp")));
        Assert.Equal(2, Delta("uffdgrpc_userfaults_ended_total", ("class", "missing"), ("outcome", "copy")));
        Assert.Equal(1, Delta("uffdgrpc_userfaults_ended_total", ("class", "missing"), ("outcome", "zeropage")));
        Assert.Equal(1, Delta("uffdgrpc_userfaults_ended_total", ("class", "wp"), ("outcome", "writeprotect")));
        Assert.Equal(4, Delta("uffdgrpc_userfaults_ended_total"));
        Assert.Equal(0, Delta("uffdgrpc_userfaults_sleeping"));
        Assert.Equal(1, asleep.Sum("uffdgrpc_userfaults_sleeping") - before.Sum("uffdgrpc_userfaults_sleeping"));
        // The histogram: a total per ended fault, in its class × outcome; waking for every
        // fault; queued and handling only for the three faults a handler read.
        const string L = "uffdgrpc_userfault_latency_seconds_count";
        Assert.Equal(2, Delta(L, ("class", "missing"), ("outcome", "copy"), ("phase", "total")));
        Assert.Equal(1, Delta(L, ("class", "missing"), ("outcome", "zeropage"), ("phase", "total")));
        Assert.Equal(1, Delta(L, ("class", "wp"), ("outcome", "writeprotect"), ("phase", "total")));
        Assert.Equal(2, Delta("uffdgrpc_userfault_latency_seconds_bucket", ("class", "missing"), ("outcome", "copy"), ("phase", "total"), ("le", "+Inf")));
        Assert.Equal(3, Delta(L, ("class", "missing"), ("phase", "waking")));
        Assert.Equal(2, Delta(L, ("class", "missing"), ("phase", "queued")));
        Assert.Equal(2, Delta(L, ("class", "missing"), ("phase", "handling")));
        Assert.Equal(1, Delta(L, ("class", "wp"), ("phase", "queued")));
        Assert.Equal(4, Delta(L, ("phase", "total")));
        Assert.True(Delta("uffdgrpc_userfault_latency_seconds_sum", ("phase", "total")) > 0);
        // RPCs by method and status, and the injection site.
        Assert.Equal(2, Delta("uffdgrpc_rpc_calls_total", ("rpc_method", "UffdioCopy"), ("rpc_grpc_status", "OK")));
        Assert.Equal(1, Delta("uffdgrpc_rpc_calls_total", ("rpc_method", "UffdioZeropage"), ("rpc_grpc_status", "OK")));
        Assert.Equal(3, Delta("uffdgrpc_rpc_calls_total", ("rpc_method", "UffdioWriteprotect"), ("rpc_grpc_status", "OK")));
        Assert.Equal(1, Delta("uffdgrpc_rpc_calls_total", ("rpc_method", "GetThread"), ("rpc_grpc_status", "NotFound")));
        Assert.Equal(1, Delta("uffdgrpc_rpc_calls_total", ("rpc_method", "CreateMachine"), ("rpc_grpc_status", "Unauthenticated")));
        Assert.Equal(1, Delta("uffdgrpc_injections_fired_total", ("site", "mmap_changing")));
        // Gauges (over every machine of the process): at least this machine's two copied pages (the zero page is free), its VMA and its process.
        Assert.True(after.Sum("uffdgrpc_resident_pages") >= 2);
        Assert.True(after.Sum("uffdgrpc_vmas") >= 1);
        Assert.True(after.Sum("uffdgrpc_address_spaces") >= 1);
        // Blocktime: the sandbox's one thread slept four times, each time the whole process was blocked.
        var thread = (await c.Threads.GetThreadAsync(new GetThreadRequest { ThreadId = s.Thread })).Thread;
        var mm = (await c.Mm.GetMmAsync(new GetMmRequest { MmId = s.Mm })).Mm;
        Assert.True(thread.BlocktimeNs > 0 && mm.BlocktimeNs == thread.BlocktimeNs, $"thread {thread.BlocktimeNs} ns, process {mm.BlocktimeNs} ns");
        Assert.True(Delta("uffdgrpc_blocktime_guest_seconds") > 0);
        Assert.True(Delta("uffdgrpc_blocktime_threads_seconds") > 0);
    }

    [Fact]
    public async Task An_open_stream_is_counted_while_it_is_open()
    {
        var c = fx.NewClient();
        await using var s = await Sandbox.CreateAsync(c, pages: 1, registerMode: 1);
        var before = await ScrapeAsync();
        using var cts = new CancellationTokenSource();
        using var stream = c.Uffd.ReadEvents(new ReadEventsRequest { UffdId = s.Uffd }, cancellationToken: cts.Token);
        await EventuallyAsync(async () => (await c.PollAsync(s.Uffd)).Readers == 1, "the stream is open");

        var open = await ScrapeAsync();
        await cts.CancelAsync();
        await EventuallyAsync(async () => (await c.PollAsync(s.Uffd)).Readers == 0, "the stream ended");
        await EventuallyAsync(async () => (await ScrapeAsync()).Sum("uffdgrpc_rpc_open_streams", ("rpc_method", "ReadEvents")) == before.Sum("uffdgrpc_rpc_open_streams", ("rpc_method", "ReadEvents")), "the gauge drops");

        Assert.Equal(1, open.Sum("uffdgrpc_rpc_open_streams", ("rpc_method", "ReadEvents")) - before.Sum("uffdgrpc_rpc_open_streams", ("rpc_method", "ReadEvents")));
    }

    [Fact]
    public async Task Each_rpc_is_an_activity_tagged_with_the_ids_it_names_and_its_machine()
    {
        var c = fx.NewClient();
        await using var s = await Sandbox.CreateAsync(c, pages: 1, registerMode: 1);
        var seen = new System.Collections.Concurrent.ConcurrentQueue<Activity>();
        using var listener = ListenToServerActivities(seen);

        await c.MmapAsync(s.Mm, B, Page, 3);
        await c.WakeAsync(s.Uffd, A, Page);
        await Assert.ThrowsAsync<RpcException>(() => c.GetMachineAsync(long.MaxValue));

        var mmap = Assert.Single(seen, a => a.DisplayName == "uffd.v1.MmService/Mmap" && Equals(a.GetTagItem("uffd.mm_id"), s.Mm));
        Assert.Equal(s.Machine, mmap.GetTagItem("uffd.machine_id"));
        Assert.Equal(ActivityKind.Server, mmap.Kind);
        Assert.Equal(0, mmap.GetTagItem("rpc.grpc.status_code"));
        var wake = Assert.Single(seen, a => a.DisplayName == "uffd.v1.UserfaultfdService/UffdioWake" && Equals(a.GetTagItem("uffd.uffd_id"), s.Uffd));
        Assert.Equal(s.Machine, wake.GetTagItem("uffd.machine_id"));
        var missing = Assert.Single(seen, a => a.DisplayName == "uffd.v1.MachineService/GetMachine" && Equals(a.GetTagItem("uffd.machine_id"), long.MaxValue));
        Assert.Equal(ActivityStatusCode.Error, missing.Status);
        Assert.Equal((int)StatusCode.NotFound, missing.GetTagItem("rpc.grpc.status_code"));
    }

    [Fact]
    public async Task An_rpc_activity_continues_the_callers_trace_from_its_traceparent_header()
    {
        // The server makes no ASP.NET Core request activity (its Hosting.Diagnostics logger is
        // off), so the RPC's own activity must read the caller's trace context itself. This
        // class's fixture logs every category to the console, which brings the request activity
        // back; a host logging as the server is configured to does not.
        using var host = new ServerLoggingFixture();
        var c = host.NewClient();
        var seen = new System.Collections.Concurrent.ConcurrentQueue<Activity>();
        using var listener = ListenToServerActivities(seen);
        var traceId = ActivityTraceId.CreateRandom();
        var parentSpan = ActivitySpanId.CreateRandom();
        var headers = new Metadata
        {
            { "traceparent", $"00-{traceId.ToHexString()}-{parentSpan.ToHexString()}-01" },
            { "tracestate", "vendor=uffd" },
        };

        var created = await c.Machines.CreateMachineAsync(new CreateMachineRequest(), headers);
        try
        {
            var a = Assert.Single(seen, a => a.DisplayName == "uffd.v1.MachineService/CreateMachine" && a.TraceId == traceId);
            Assert.Equal(parentSpan, a.ParentSpanId);
            Assert.True(a.HasRemoteParent);
            Assert.Equal("vendor=uffd", a.TraceStateString);

            // Without the header the activity starts a trace of its own.
            await c.GetMachineAsync(created.Machine.MachineId);
            var root = Assert.Single(seen, a => a.DisplayName == "uffd.v1.MachineService/GetMachine" && Equals(a.GetTagItem("uffd.machine_id"), created.Machine.MachineId));
            Assert.Equal(default, root.ParentSpanId);
            Assert.NotEqual(traceId, root.TraceId);
        }
        finally
        {
            await c.DestroyMachineAsync(created.Machine.MachineId);
        }
    }

    /// <summary>A test server whose console logger leaves ASP.NET Core's request diagnostics off, as the server's configuration does.</summary>
    private sealed class ServerLoggingFixture : GrpcTestFixture
    {
        protected override void ConfigureWebHost(IWebHostBuilder builder)
        {
            base.ConfigureWebHost(builder);
            builder.ConfigureLogging(l => l.AddFilter<Microsoft.Extensions.Logging.Console.ConsoleLoggerProvider>("Microsoft.AspNetCore.Hosting.Diagnostics", LogLevel.None));
        }
    }
}
