using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using UffdGrpc.Client;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Cli;

/// <summary>
/// <c>demo</c>: the seed's four steps (fork, write-protect, the WP fault before COW, reuse)
/// across three processes: this "guest" client, whose thread writes; a handler client in
/// another OS process (<c>demo-handler</c>) that reads the fault from the event stream and
/// un-protects; and the forked child (a simulated process on the server).
/// </summary>
internal static class DemoCommand
{
    private const ulong A = 0x7e00_0000_0000;
    private const ulong Page = 4096;

    public static Command Build()
    {
        var server = new Option<string>("--server") { Description = "UffdGrpc server URL", DefaultValueFactory = _ => CliCommands.DefaultServer };
        var cmd = new Command("demo", "Tell the seed story (fork, wp, WP fault before COW, reuse) across a guest, a remote handler process and the forked child.") { server };
        cmd.SetAction((parse, ct) => CliCommands.GuardAsync("demo", () => RunGuestAsync(parse.GetValue(server)!, ct)));
        return cmd;
    }

    public static Command BuildHandler()
    {
        var server = new Option<string>("--server") { Description = "UffdGrpc server URL", DefaultValueFactory = _ => CliCommands.DefaultServer };
        var uffd = new Option<long>("--uffd") { Description = "The uffd id to serve", Required = true };
        var cmd = new Command("demo-handler", "The demo's handler process: serve a uffd's faults by un-protecting them.") { server, uffd };
        cmd.Hidden = true;
        cmd.SetAction((parse, ct) => CliCommands.GuardAsync("demo-handler", () => RunHandlerAsync(parse.GetValue(server)!, parse.GetValue(uffd), ct)));
        return cmd;
    }

    private static void Say(string who, string line) => Console.Out.WriteLine($"{who,-8}| {line}");

    private readonly record struct ByteStringLike(byte Value)
    {
        public override string ToString() => "0x" + Value.ToString("x2", CultureInfo.InvariantCulture);
    }

    private static async Task<string> PageIdAsync(UffdClient c, long mm, ulong addr)
    {
        var e = (await c.PagemapAsync(mm, addr, 1).ConfigureAwait(false))[0];
        var flags = new List<string>();
        if (e.Exclusive)
            flags.Add("exclusive");
        if (e.UffdWp)
            flags.Add("uffd-wp");
        return e.Present ? $"pfn {e.Pfn:x} {string.Join(' ', flags)}".TrimEnd() : "not present";
    }

    private static async Task<int> RunGuestAsync(string url, CancellationToken ct)
    {
        using var c = CliCommands.Connect(url);
        var machine = (await c.CreateMachineAsync(ct: ct).ConfigureAwait(false)).MachineId;
        Process? handler = null;
        try
        {
            var mm = await c.CreateMmAsync(machine, ct).ConfigureAwait(false);
            var thread = await c.CreateThreadAsync(mm, ct).ConfigureAwait(false);
            Say("guest", $"machine {machine}, process {mm}, thread {thread.ThreadId} (tid {thread.Tid})");
            Check(await c.MmapAsync(mm, A, Page, 3, ct: ct).ConfigureAwait(false), "mmap");
            await c.WriteAsync(thread.ThreadId, A, 0x11, ct: ct).ConfigureAwait(false);
            Say("guest", $"mmap A (1 page, private anon) and write 0x11: {await PageIdAsync(c, mm, A).ConfigureAwait(false)}");
            var (e, uffd) = await c.CreateUffdAsync(mm, ct: ct).ConfigureAwait(false);
            Check(e, "userfaultfd");
            Check((await c.ApiAsync(uffd, features: 1 << 8, ct: ct).ConfigureAwait(false)).Errno, "UFFDIO_API");
            Check((await c.RegisterAsync(uffd, A, Page, 2, ct).ConfigureAwait(false)).Errno, "UFFDIO_REGISTER");
            Say("guest", $"uffd {uffd}: API with THREAD_ID, REGISTER A mode=WP");

            handler = StartHandlerProcess(url, uffd);
            await WaitForReaderAsync(c, uffd, ct).ConfigureAwait(false);

            // 1. fork: the child shares the page (COW).
            var fork = await c.ForkAsync(mm, thread.ThreadId, ct).ConfigureAwait(false);
            Check(fork.Errno, "fork");
            Say("guest", $"1. fork -> child process {fork.ChildMmId}; A is shared: {await PageIdAsync(c, mm, A).ConfigureAwait(false)}");
            // 2. write-protect in the parent.
            Check(await c.WriteprotectAsync(uffd, A, Page, 1, ct).ConfigureAwait(false), "UFFDIO_WRITEPROTECT");
            Say("guest", $"2. UFFDIO_WRITEPROTECT A: {await PageIdAsync(c, mm, A).ConfigureAwait(false)}");
            var child = await c.WriteAsync(fork.ChildThreadId, A, 0x22, ct: ct).ConfigureAwait(false);
            Say("child", $"write A 0x22: {Outcome(child)} (no uffd in the child: it copies at once): {await PageIdAsync(c, fork.ChildMmId, A).ConfigureAwait(false)}");
            // 3. the parent's write: a WP fault, taken before any copy-on-write.
            var before = await PageIdAsync(c, mm, A).ConfigureAwait(false);
            Say("guest", $"3. write A 0x33 ... (A is {before})");
            var sw = Stopwatch.StartNew();
            var w = await c.WriteAsync(thread.ThreadId, A, 0x33, ct: ct).ConfigureAwait(false);
            sw.Stop();
            // 4. reuse: the page was exclusive again, so the write reused it.
            var after = await PageIdAsync(c, mm, A).ConfigureAwait(false);
            Say("guest", $"4. write A 0x33: {Outcome(w)} after {sw.Elapsed.TotalMilliseconds:F1} ms in the userfault; A is {after} ({(before.Split(' ')[1] == after.Split(' ')[1] ? "same page: reused" : "a new page: copied")})");
            var pr = await c.ReadAsync(thread.ThreadId, A, ct: ct).ConfigureAwait(false);
            var cr = await c.ReadAsync(fork.ChildThreadId, A, ct: ct).ConfigureAwait(false);
            Say("guest", $"read A = {new ByteStringLike(pr.Values[0])}");
            Say("child", $"read A = {new ByteStringLike(cr.Values[0])}");
            await c.CloseUffdAsync(uffd, ct).ConfigureAwait(false);
            Say("guest", "close uffd: the handler's stream ends");
            await handler.WaitForExitAsync(ct).ConfigureAwait(false);
            return handler.ExitCode;
        }
        finally
        {
            if (handler is { HasExited: false })
                handler.Kill();
            handler?.Dispose();
            await c.DestroyMachineAsync(machine, CancellationToken.None).ConfigureAwait(false);
        }
    }

    private static string Outcome(ThreadOpResult r) =>
        r.Signal != SignalCode.Unspecified ? r.Signal.ToString() : r.Errno.Name();

    private static void Check(Errno e, string what)
    {
        e.Expect(what);
    }

    private static Process StartHandlerProcess(string url, long uffd)
    {
        var self = Environment.ProcessPath ?? "dotnet";
        var psi = new ProcessStartInfo(self) { RedirectStandardOutput = true, UseShellExecute = false };
        if (Path.GetFileNameWithoutExtension(self) == "dotnet")
            psi.ArgumentList.Add(typeof(DemoCommand).Assembly.Location);
        foreach (var a in new[] { "demo-handler", "--server", url, "--uffd", uffd.ToString(CultureInfo.InvariantCulture) })
            psi.ArgumentList.Add(a);
        var p = Process.Start(psi)!;
        p.OutputDataReceived += (_, e) =>
        {
            if (e.Data is not null)
                Console.Out.WriteLine(e.Data);
        };
        p.BeginOutputReadLine();
        return p;
    }

    /// <summary>Waits until the handler process has its event stream open on <paramref name="uffd"/>.</summary>
    private static async Task WaitForReaderAsync(UffdClient c, long uffd, CancellationToken ct)
    {
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(ct);
        timeout.CancelAfter(TimeSpan.FromSeconds(30));
        while ((await c.PollAsync(uffd, ct: timeout.Token).ConfigureAwait(false)).Readers == 0)
            await Task.Delay(20, timeout.Token).ConfigureAwait(false);
    }

    private static async Task<int> RunHandlerAsync(string url, long uffd, CancellationToken ct)
    {
        using var c = CliCommands.Connect(url);
        Say("handler", $"process {Environment.ProcessId}: reading uffd {uffd}'s events");
        await foreach (var msg in c.ReadEventsAsync(uffd, ct).ConfigureAwait(false))
        {
            if (msg.Pagefault is not { } pf)
            {
                Say("handler", $"event {msg.Event}");
                continue;
            }
            var page = pf.Address & ~(Page - 1);
            Say("handler", $"pagefault at 0x{pf.Address:x} flags={(pf.Write ? "WRITE|" : "")}{(pf.Wp ? "WP" : "")} ptid={pf.Ptid}");
            // Say it first: the guest's write returns the moment this ioctl wakes it.
            Say("handler", $"UFFDIO_WRITEPROTECT 0x{page:x} mode=0 (un-protect and wake)");
            var e = await c.WriteprotectAsync(uffd, page, Page, 0, ct).ConfigureAwait(false);
            if (!e.IsOk())
                Say("handler", $"UFFDIO_WRITEPROTECT failed: {e}");
        }
        Say("handler", "stream ended (uffd closed)");
        return 0;
    }
}
