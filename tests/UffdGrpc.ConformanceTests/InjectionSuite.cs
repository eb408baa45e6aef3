using UffdGrpc.Client;
using UffdGrpc.Scenarios;

namespace UffdGrpc.ConformanceTests;

/// <summary>
/// Every injection site of the scenario language, scripted with <c>inject</c>: each script
/// is replayed in-process and through the server, the two traces must be identical, and the
/// lines that show what the blocked thread, the handler and pagemap observe must appear in
/// order. Where the kernel has a user-visible trigger for the same event, the injected
/// event must leave the state the recorded trace of the trigger shows.
/// </summary>
public class InjectionSuite(TestServerFixture server) : IClassFixture<TestServerFixture>
{
    private const string MissingA = "map A 4 anon private rw\nuffd open\nregister A 0 4 missing\nhandler none\n";

    public static TheoryData<string, string, string[]> Cases => new()
    {
        {
            "mmap_changing: fills, MOVE and WRITEPROTECT get EAGAIN while the window is open, for as many calls as it lasts; the thread sleeps on",
            MissingA + "write A 0 0x11\ninject mmap_changing\ncopy A 0 1 0x22\nzeropage A 0 1\ncopy A 0 1 0x22\ninject remove 1\ncopy A 0 1 0x22\npagemap A 0 1",
            ["worker: write A 0 0x11 blocked", "> copy A 0 1 0x22", "EAGAIN copy=-EAGAIN", "EAGAIN zeropage=-EAGAIN", "EAGAIN copy=-EAGAIN", "> inject remove 1", "ok copy=4096", "worker: write A 0 0x11 ok", "pagemap A 0: present exclusive"]
        },
        {
            "mmap_changing on WRITEPROTECT and MOVE",
            "map A 2 anon private rw\nwrite A 0 0x11\nuffd open wp move\nregister A 0 2 wp\ninject mmap_changing times=2\nwp A 0 1\nmove A 1 A 0 1\nwp A 0 1\npagemap A 0 1",
            ["> wp A 0 1", "EAGAIN", "> move A 1 A 0 1", "EAGAIN move=-EAGAIN", "> wp A 0 1", "ok", "pagemap A 0: present exclusive uffd-wp"]
        },
        {
            "fill_partial: COPY stops after two pages with the partial count; the done range is woken, a thread past it sleeps until the rest is filled",
            MissingA + "write A 3 0x11\ninject fill_partial pages=2 times=1\ncopy A 0 4 0x22\npagemap A 0 4\ncopy A 2 2 0x22",
            ["worker: write A 3 0x11 blocked", "EAGAIN copy=8192", "pagemap A 0-1: present exclusive", "pagemap A 2-3: none", "> copy A 2 2 0x22", "ok copy=8192", "worker: write A 3 0x11 ok"]
        },
        {
            "fill_race: a DONTWAKE fill of the same page by another thread wins: EEXIST, the thread sleeps until the handler WAKEs, and reads the winner's bytes",
            MissingA + "read A 3\ninject fill_race times=1\ncopy A 3 1 0x33\npagemap A 3 1\nwake A 3 1",
            ["worker: read A 3 blocked", "EEXIST copy=-EEXIST", "pagemap A 3: present exclusive", "> wake A 3 1", "worker: read A 3 = 0x33"]
        },
        {
            "fill_race with wake: the winner's fill wakes the thread; ours still gets EEXIST",
            MissingA + "read A 3\ninject fill_race wake times=1\nzeropage A 3 1",
            ["worker: read A 3 blocked", "EEXIST zeropage=-EEXIST", "worker: read A 3 = 0x00"]
        },
        {
            "fill_nomem: the page a COPY allocates cannot be charged: ENOMEM at the first page, a partial count (EAGAIN) past it",
            MissingA + "inject fill_nomem times=1\ncopy A 0 1 0x11\ninject fill_nomem after=1 times=1\ncopy A 1 2 0x22\npagemap A 0 4",
            ["ENOMEM copy=-ENOMEM", "EAGAIN copy=4096", "pagemap A 0: none", "pagemap A 1: present exclusive", "pagemap A 2-3: none"]
        },
        {
            "fault_oom: VM_FAULT_OOM in a user write retries the fault and the write lands; a kernel access gets EFAULT; populate gets ENOMEM",
            "map A 4 anon private rw\ninject fault_oom times=1\nwrite A 0 0x11\ninject fault_oom times=1\nkwrite A 1 0x22\ninject fault_oom times=1\npopulate A 2 1 write\ninject log\npagemap A 0 4",
            ["worker: write A 0 0x11 ok", "worker: kwrite A 1 0x22 EFAULT", "worker: populate A 2 1 write ENOMEM", "injection fault_oom A 0", "injection fault_oom A 1", "injection fault_oom A 2", "pagemap A 0: present exclusive", "pagemap A 1-3: none"]
        },
        {
            "target_exiting: the target process is exiting: ESRCH with the field untouched, and its thread asleep in the fault is gone",
            "map A 2 anon private rw\nuffd open fork\nregister A 0 2 missing\nhandler none\nfork\nuffd use u1\nchild: write A 0 0x22\ninject target_exiting uffd=u1 times=1\ncopy A 0 1 0x55\nzeropage A 1 1\nuffd poll",
            ["child: write A 0 0x22 blocked", "ESRCH copy=untouched", "ESRCH zeropage=untouched", "poll: none"]
        },
        {
            "signal: a non-fatal signal after the handler read the fault: VM_FAULT_RETRY, the write faults again and a second PAGEFAULT for the same address is queued; one fill resolves both",
            "map A 2 anon private rw\nuffd open thread_id\nregister A 0 2 missing\ninject signal times=1\nhandler none\nwrite A 0 0x11\nuffd poll\ncopy A 0 1 0x55\ninject log\nread A 0",
            ["event u0 pagefault A 0 flags=WRITE tid=worker", "event u0 pagefault A 0 flags=WRITE tid=worker", "worker: write A 0 0x11 blocked", "poll: none", "ok copy=4096", "worker: write A 0 0x11 ok", "injection signal A 0", "worker: read A 0 = 0x11"]
        },
        {
            "signal before the message is read: it leaves the queue and the retry queues the only one the handler reads",
            "map A 2 anon private rw\nuffd open\nregister A 0 2 missing\nhandler off\nwrite A 0 0x11\ninject now signal tid=worker\nuffd events\ncopy A 0 1 0x55",
            ["worker: write A 0 0x11 blocked", "ok fired=1", "event u0 pagefault A 0 flags=WRITE", "messages=1", "ok copy=4096", "worker: write A 0 0x11 ok"]
        },
        {
            "signal is for user-mode faults only: a kernel access asleep in a userfault is not eligible",
            "map A 2 anon private rw\nuffd open\nregister A 0 2 missing\nhandler none\nkwrite A 0 0x11\ninject now signal\ncopy A 0 1 0x55",
            ["worker: kwrite A 0 0x11 blocked", "ENOENT nothing in the rule's scope to act on", "ok copy=4096", "worker: kwrite A 0 0x11 ok"]
        },
        {
            "fatal_signal: SIGKILL of the child asleep in its fault: the process exits, its fault disappears, later fills get ESRCH (as z00 recorded with a real kill)",
            "map A 2 anon private rw\nuffd open fork\nregister A 0 2 missing\nhandler none\nfork\nuffd events\nuffd use u1\ninject fatal_signal tid=child times=1\nchild: write A 0 0x22\nuffd events\nuffd poll\ncopy A 0 1 0x55\nzeropage A 1 1\npagemap A 0 2",
            ["event u1 pagefault A 0 flags=WRITE", "poll: none", "ESRCH copy=untouched", "ESRCH zeropage=untouched", "pagemap A 0-1: none"]
        },
        {
            "read_event_first is refused nothing: with only faults queued it never fires",
            MissingA + "inject read_event_first\nwrite A 0 0x11\ncopy A 0 1 0x11\ninject log",
            ["event u0 pagefault A 0 flags=WRITE", "worker: write A 0 0x11 ok", "> inject log", "ok"]
        },
        {
            "thp_split: split_huge_pmd of a written THP: no longer PMD-mapped, the folio stays a THP, contents and uffd-wp kept, no event",
            "require thp\nmap A 512 anon private rw\nthp A on\nwrite A 0 0x11\nuffd open\nregister A 0 512 wp\nwp A 0 512\nvmas A\ninject now thp_split A 0 512\nvmas A\npagemap A 0 2\nread A 0",
            ["vma A 0-511 rw-p flags=uw,hg rss=512 swap=0 pmd_mapped=1", "ok fired=1", "vma A 0-511 rw-p flags=uw,hg rss=512 swap=0 pmd_mapped=0", "pagemap A 0-1: present exclusive uffd-wp thp", "worker: read A 0 = 0x11"]
        },
        {
            "migrate: a new frame, the same bytes, uffd-wp kept (the next write still faults WP)",
            "map A 2 anon private rw\nwrite A 0 0x11\nuffd open\nregister A 0 2 wp\nwp A 0 1\npageid A 0\ninject now migrate A 0 1\npageid A 0\npagemap A 0 1\nhandler unwp\nwrite A 0 0x22\nread A 0",
            ["pageid A 0: #1", "ok fired=1", "pageid A 0: #2", "pagemap A 0: present exclusive uffd-wp", "event u0 pagefault A 0 flags=WRITE|WP", "worker: write A 0 0x22 ok", "worker: read A 0 = 0x22"]
        },
        {
            "longterm_pin across fork: the pinned page is copied into the child at fork (the parent keeps its frame); without EVENT_FORK the copy has no uffd-wp",
            "map A 1 anon private rw\nwrite A 0 0x11\nuffd open\nregister A 0 1 wp\nwp A 0 1\npageid A 0\ninject longterm_pin A 0 1 times=1\nfork\npageid A 0\nchild: pageid A 0\nchild: pagemap A 0 1\npagemap A 0 1\nchild: read A 0",
            ["pageid A 0: #1", "> fork", "pageid A 0: #1", "child: pageid A 0: #2", "child: pagemap A 0: present exclusive", "pagemap A 0: present exclusive uffd-wp", "child: read A 0 = 0x11"]
        },
        {
            "longterm_pin across fork with EVENT_FORK: the child's copy keeps uffd-wp",
            "map A 1 anon private rw\nwrite A 0 0x11\nuffd open fork\nregister A 0 1 wp\nwp A 0 1\ninject longterm_pin A 0 1 times=1\nfork\nchild: pagemap A 0 1",
            ["event u0 fork -> u1", "child: pagemap A 0: present exclusive uffd-wp"]
        },
    };

    private static async Task<string> InProcessAsync(string script)
    {
        var sw = new StringWriter { NewLine = "\n" };
        await using var backend = new InProcessBackend();
        await new ScenarioInterpreter(backend, sw).RunAsync(new StringReader(script));
        return sw.ToString();
    }

    private async Task<string> OverGrpcAsync(string script)
    {
        var sw = new StringWriter { NewLine = "\n" };
        using var client = new UffdClient(server.Channel);
        await using var backend = new GrpcBackend(client);
        await new ScenarioInterpreter(backend, sw).RunAsync(new StringReader(script));
        return sw.ToString();
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public async Task Injection_site_shows_the_kernel_outcome_in_process_and_over_grpc(string what, string script, string[] expected)
    {
        var local = await InProcessAsync(script);
        var remote = await OverGrpcAsync(script);
        Assert.True(Replay.FirstDifference(local, remote) is null, $"{what}: in-process and gRPC differ: {Replay.FirstDifference(local, remote)}\n{local}");
        var lines = local.Split('\n');
        var at = 0;
        foreach (var e in expected)
        {
            var i = Array.FindIndex(lines, at, l => l == e);
            Assert.True(i >= 0, $"{what}: expected «{e}» after line {at} in:\n{local}");
            at = i + 1;
        }
    }

    public static TheoryData<string, string, string> Triggers => new()
    {
        { "p08-madvise-anon", "madvise A 2 2 pageout", "inject now reclaim A 2 2" },
        { "p50-collapse-wp", "madvise T 0 512 collapse", "inject now collapse T 0 512" },
        { "q04-collapse-pte-mapped-thp", "madvise T 0 512 collapse", "inject now collapse T 0 512" },
        { "z00-child-kill-blocked-fill", "child kill", "inject now fatal_signal tid=child" },
    };

    /// <summary>
    /// The injected event in place of the real trigger of a recorded scenario leaves the same
    /// trace: every line but the replaced command's echo and result (and, for a kill, the
    /// line the harness prints when it reaps the child) is the kernel's.
    /// </summary>
    [Theory]
    [MemberData(nameof(Triggers))]
    public async Task Injected_event_leaves_the_state_of_its_real_trigger(string scenario, string trigger, string injected)
    {
        var path = Path.Combine(ScenarioFolders.Project, scenario + ".scn");
        var script = await File.ReadAllTextAsync(path);
        var golden = (await File.ReadAllTextAsync(Path.ChangeExtension(path, ".out"))).Split('\n');
        Assert.Contains(trigger, script.Split('\n'));
        var replaced = string.Join('\n', script.Split('\n').Select(l => l == trigger ? injected : l));
        foreach (var trace in new[] { await InProcessAsync(replaced), await OverGrpcAsync(replaced) })
        {
            var got = trace.Split('\n');
            Assert.Equal(Mask(golden, "> " + trigger), Mask(got, "> " + injected));
        }
    }

    /// <summary>
    /// THP split: the kernel's user-visible triggers (a partial munmap or mprotect of a
    /// PMD-mapped THP) split the PMD and also change the range, so the injected split goes
    /// just before the trigger: the trigger then finds the PTE-mapped THP the injected split
    /// left, and the recorded trace must come out unchanged (but for the injected line).
    /// </summary>
    [Theory]
    [InlineData("p12-thp-split-munmap-mprotect", "munmap T 511 1", "inject now thp_split T 0 512")]
    [InlineData("p12-thp-split-munmap-mprotect", "mprotect U 256 256 r", "inject now thp_split U 0 512")]
    public async Task Injected_split_before_its_real_trigger_leaves_the_trace_of_the_trigger(string scenario, string trigger, string injected)
    {
        var path = Path.Combine(ScenarioFolders.Project, scenario + ".scn");
        var script = await File.ReadAllTextAsync(path);
        var golden = (await File.ReadAllTextAsync(Path.ChangeExtension(path, ".out"))).Split('\n');
        Assert.Contains(trigger, script.Split('\n'));
        var replaced = string.Join('\n', script.Split('\n').SelectMany(l => l == trigger ? new[] { injected, l } : [l]));
        foreach (var trace in new[] { await InProcessAsync(replaced), await OverGrpcAsync(replaced) })
        {
            var got = trace.Split('\n');
            Assert.Contains("ok fired=1", got);
            Assert.Equal(golden, Mask(got, "> " + injected));
        }
    }

    /// <summary>The trace without the echo of <paramref name="echo"/>, the result line after it and a reaped child's line.</summary>
    private static List<string> Mask(string[] lines, string echo)
    {
        var r = new List<string>();
        for (var i = 0; i < lines.Length; i++)
        {
            if (lines[i] == echo)
            {
                i++;
                continue;
            }
            if (lines[i] != "child killed by signal 9")
                r.Add(lines[i]);
        }
        return r;
    }
}
