using Google.Protobuf;

namespace UffdGrpc.ContractTests;

/// <summary>A server whose journals hold 8 steps.</summary>
public sealed class SmallJournalFixture : GrpcTestFixture
{
    protected override IReadOnlyDictionary<string, string?> Settings { get; } = new Dictionary<string, string?>
    {
        ["Limits:JournalEntriesPerMachine"] = "8",
        ["Limits:JournalBytesPerMachine"] = "20000",
    };
}

/// <summary>
/// The session journal: random seeded sessions (random RPC sequences with injections, threads
/// asleep in userfaults, handler reads and resolutions) recorded on a journaled machine, then
/// replayed in-process and against a real server process: every step, answer and the final
/// state digest identical.
/// </summary>
public sealed class JournalTests(GrpcTestFixture fx, ServerProcessFixture real) : IClassFixture<GrpcTestFixture>, IClassFixture<ServerProcessFixture>
{
    [Fact]
    public async Task Hundred_random_sessions_replay_identically_in_process_and_against_a_server()
    {
        using var client = fx.NewClient();
        using var remote = new UffdClient(real.Server.Address);
        var steps = 0L;
        var sleepers = 0;
        for (var seed = 1; seed <= 100; seed++)
        {
            var (journal, slept) = await RecordRandomSessionAsync(client, seed);
            steps += journal.Entries.Count;
            sleepers += slept;
            // Through the file format.
            using var file = new MemoryStream();
            journal.WriteTo(file);
            file.Position = 0;
            var read = SessionJournal.ReadFrom(file);
            Assert.Equal(journal.Entries.Count, read.Entries.Count);

            var inProcess = await new SessionReplayer(client).ReplayAsync(read);
            Assert.True(inProcess.Identical, $"seed {seed}, in-process: {inProcess.First}");
            var server = await new SessionReplayer(remote).ReplayAsync(read);
            Assert.True(server.Identical, $"seed {seed}, against a server: {server.First}");
            Assert.Equal(journal.End.StateDigest.ToByteArray(), server.StateDigest);
        }
        // The sessions did what they are for: many steps, threads that slept in userfaults.
        Assert.True(steps > 3000, $"{steps} steps");
        Assert.True(sleepers > 100, $"{sleepers} calls slept");
        Assert.Empty(fx.Errors);
        Assert.Empty(real.Server.Errors);
    }

    [Fact]
    public async Task A_changed_answer_is_reported_at_its_step()
    {
        using var client = fx.NewClient();
        var (journal, _) = await RecordRandomSessionAsync(client, 7);
        // Say that one access read a different byte than it did.
        var i = journal.Entries.ToList().FindIndex(e => e.Method == "uffd.v1.ThreadService/Access" && e.Completed && e.StatusCode == 0
            && AccessResponse.Parser.ParseFrom(e.Response).Result.Values.Length > 0);
        Assert.True(i >= 0);
        var entries = journal.Entries.Select(e => e.Clone()).ToList();
        var r = AccessResponse.Parser.ParseFrom(entries[i].Response);
        var values = r.Result.Values.ToByteArray();
        values[0] ^= 0xff;
        r.Result.Values = ByteString.CopyFrom(values);
        entries[i].Response = r.ToByteString();
        var tampered = new SessionJournal { Header = journal.Header, Entries = entries, End = journal.End };

        var report = await new SessionReplayer(client).ReplayAsync(tampered);
        Assert.False(report.Identical);
        Assert.Equal(entries[i].Step, report.First!.Step);
        Assert.Contains("result.values", report.First.What, StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_different_schedule_seed_is_replayed_without_checks_and_a_journal_file_is_validated()
    {
        using var client = fx.NewClient();
        var (journal, _) = await RecordRandomSessionAsync(client, 11);
        var other = await new SessionReplayer(client) { ScheduleSeed = 12345 }.ReplayAsync(journal);
        Assert.Equal(32, other.StateDigest.Length);

        using var bad = new MemoryStream();
        new JournalRecord { Entry = new JournalEntry { Step = 1 } }.WriteDelimitedTo(bad);
        bad.Position = 0;
        var ex = Assert.Throws<InvalidDataException>(() => SessionJournal.ReadFrom(bad));
        Assert.Contains("out of place", ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Read_journal_of_a_machine_without_one_and_an_import_into_a_journaled_one_are_failed_precondition()
    {
        using var client = fx.NewClient();
        var m = await client.CreateMachineAsync();
        var ex = await Assert.ThrowsAsync<RpcException>(async () => await client.Machines.ReadJournalAsync(new ReadJournalRequest { MachineId = m.MachineId }));
        Assert.Equal(StatusCode.FailedPrecondition, ex.StatusCode);

        var mm = (await client.Mm.CreateMmAsync(new CreateMmRequest { MachineId = m.MachineId })).Mm.MmId;
        var image = await client.ExportMmAsync(mm);
        var journaled = (await client.Machines.CreateMachineAsync(new CreateMachineRequest { Settings = new MachineSettings { Journal = true } })).Machine.MachineId;
        ex = await Assert.ThrowsAsync<RpcException>(() => client.ImportMmAsync(journaled, image));
        Assert.Equal(StatusCode.FailedPrecondition, ex.StatusCode);
        Assert.Equal(0, (await client.Machines.ReadJournalAsync(new ReadJournalRequest { MachineId = journaled })).Steps);
        await client.Machines.DestroyMachineAsync(new DestroyMachineRequest { MachineId = m.MachineId });
        await client.Machines.DestroyMachineAsync(new DestroyMachineRequest { MachineId = journaled });
    }

    /// <summary>
    /// Records one random session on a journaled machine and returns its journal (and how many
    /// calls were still asleep right after the server ran them).
    /// </summary>
    internal static async Task<(SessionJournal Journal, int Slept)> RecordRandomSessionAsync(UffdClient c, int seed)
    {
        var rnd = new Random(seed);
        var created = await c.Machines.CreateMachineAsync(new CreateMachineRequest
        {
            Settings = new MachineSettings { Journal = true, ScheduleSeed = (ulong)rnd.NextInt64(), Swap = rnd.Next(2) == 0 },
        });
        var machine = created.Machine.MachineId;
        var mm = (await c.Mm.CreateMmAsync(new CreateMmRequest { MachineId = machine })).Mm.MmId;
        var threads = new List<long>();
        for (var i = 0; i < 3; i++)
            threads.Add((await c.Threads.CreateThreadAsync(new CreateThreadRequest { MmId = mm })).Thread.ThreadId);
        const ulong a = A, b = B;
        Assert.Equal(Errno.Unspecified, (await c.Mm.MmapAsync(new MmapRequest { MmId = mm, Addr = a, Len = 16 * Page, Prot = 3 })).Errno);
        Assert.Equal(Errno.Unspecified, (await c.Mm.MmapAsync(new MmapRequest { MmId = mm, Addr = b, Len = 8 * Page, Prot = 3, Shared = true })).Errno);
        var uffd = (await c.Uffd.UserfaultfdAsync(new UserfaultfdRequest { MmId = mm, Flags = 0x800 })).UffdId;
        await c.Uffd.UffdioApiAsync(new UffdioApiRequest { UffdId = uffd, Api = 0xAA, Features = 1 << 8 }); // THREAD_ID
        await c.Uffd.UffdioRegisterAsync(new UffdioRegisterRequest { UffdId = uffd, Start = a, Len = 16 * Page, Mode = 3 });

        var calls = new List<Task>();
        var slept = 0;
        async Task Issue<T>(AsyncUnaryCall<T> call)
        {
            calls.Add(call.ResponseAsync);
            try
            {
                await call.ResponseHeadersAsync;
            }
            catch (RpcException)
            {
                // Refused before the model ran it (it has no step).
            }
            // The model has run it; still unanswered means the thread sleeps.
            if (!call.ResponseAsync.IsCompleted)
                slept++;
        }

        ulong PageIn(ulong start, int pages) => start + ((ulong)rnd.Next(pages) * Page);
        ulong AnyPage() => rnd.Next(3) == 0 ? PageIn(b, 8) : PageIn(a, 16);
        ulong Len(int max) => (ulong)rnd.Next(1, max + 1) * Page;
        InjectSite[] sites = [InjectSite.MmapChanging, InjectSite.FillPartial, InjectSite.FillRace, InjectSite.FillNomem, InjectSite.ReadEventFirst,
            InjectSite.Signal, InjectSite.FaultOom, InjectSite.Reclaim, InjectSite.Migrate];
        var n = rnd.Next(25, 45);
        for (var i = 0; i < n; i++)
        {
            var t = threads[rnd.Next(threads.Count)];
            switch (rnd.Next(12))
            {
                case 0 or 1:
                    await Issue(c.Threads.AccessAsync(new AccessRequest
                    {
                        ThreadId = t,
                        Access = new AccessOp { Addr = AnyPage(), Write = rnd.Next(2) == 0, Touch = new TouchPattern { Pages = (uint)rnd.Next(1, 3), Value = (uint)rnd.Next(256) } },
                    }));
                    break;
                case 2:
                    await Issue(c.Uffd.UffdioWriteprotectAsync(new UffdioWriteprotectRequest { UffdId = uffd, Start = PageIn(a, 12), Len = Len(4), Mode = 1 }));
                    break;
                case 3:
                    await Issue(c.Uffd.UffdioWriteprotectAsync(new UffdioWriteprotectRequest { UffdId = uffd, Start = PageIn(a, 12), Len = Len(4), Mode = 0 }));
                    break;
                case 4:
                    await Issue(c.Uffd.UffdioCopyAsync(new UffdioCopyRequest { UffdId = uffd, Dst = PageIn(a, 14), Len = Len(2), Mode = (ulong)rnd.Next(3), Fill = (uint)rnd.Next(256) }));
                    break;
                case 5:
                    await Issue(c.Uffd.UffdioZeropageAsync(new UffdioZeropageRequest { UffdId = uffd, Start = PageIn(a, 15), Len = Page }));
                    break;
                case 6:
                    await Issue(c.Uffd.UffdioWakeAsync(new UffdioWakeRequest { UffdId = uffd, Start = a, Len = 16 * Page }));
                    break;
                case 7:
                    await Issue(c.Uffd.ReadAsync(new ReadRequest { UffdId = uffd }));
                    break;
                case 8:
                    await Issue(c.Mm.MadviseAsync(new MadviseRequest { MmId = mm, ThreadId = t, Start = rnd.Next(2) == 0 ? PageIn(a, 12) : PageIn(b, 6), Len = Len(3), Advice = rnd.Next(2) == 0 ? 4 : 21 }));
                    break;
                case 9:
                    await Issue(c.Mm.MprotectAsync(new MprotectRequest { MmId = mm, Start = PageIn(a, 12), Len = Len(4), Prot = (uint)(rnd.Next(2) == 0 ? 1 : 3) }));
                    break;
                case 10:
                    await Issue(c.Injection.AddRuleAsync(new AddRuleRequest
                    {
                        MachineId = machine,
                        Rule = new InjectRule { Site = sites[rnd.Next(sites.Length)], Probability = 0.5, MaxFirings = 3, Seed = (ulong)rnd.NextInt64(), Pages = 1, Start = a, End = a + (16 * Page) },
                    }));
                    break;
                default:
                    var batch = new ResolveRequest { UffdId = uffd };
                    var p = PageIn(a, 15);
                    batch.Resolutions.Add(new Resolution { UffdioCopy = new UffdioCopyRequest { Dst = p, Len = Page, Fill = (uint)rnd.Next(256), Mode = 1 } });
                    batch.Resolutions.Add(new Resolution { UffdioWake = new UffdioWakeRequest { Start = p, Len = Page } });
                    await Issue(c.Uffd.ResolveAsync(batch));
                    break;
            }
        }
        // The end: closing the uffd wakes every sleeper (MISSING faults get the zero page, WP writes proceed).
        await Issue(c.Uffd.CloseAsync(new CloseRequest { UffdId = uffd }));
        foreach (var call in calls)
        {
            try
            {
                await call.WaitAsync(TimeSpan.FromSeconds(30));
            }
            catch (RpcException)
            {
                // A kernel-refused call is a result too (it is in the journal).
            }
        }
        var journal = await SessionJournal.ExportAsync(c, machine);
        await c.Machines.DestroyMachineAsync(new DestroyMachineRequest { MachineId = machine });
        return (journal, slept);
    }
}

/// <summary>The journal's limits: past Limits:JournalEntriesPerMachine or JournalBytesPerMachine a call is refused and changes nothing.</summary>
public sealed class JournalLimitTests(SmallJournalFixture fx) : IClassFixture<SmallJournalFixture>
{
    [Fact]
    public async Task A_full_journal_refuses_the_next_call_with_resource_exhausted_and_nothing_changes()
    {
        using var c = fx.NewClient();
        var machine = (await c.Machines.CreateMachineAsync(new CreateMachineRequest { Settings = new MachineSettings { Journal = true } })).Machine.MachineId;
        var mm = (await c.Mm.CreateMmAsync(new CreateMmRequest { MachineId = machine })).Mm.MmId;
        for (var i = 0; i < 7; i++)
            Assert.Equal(Errno.Unspecified, (await c.Mm.MmapAsync(new MmapRequest { MmId = mm, Addr = A + ((ulong)i * 2 * Page), Len = Page, Prot = 3 })).Errno);
        var vmas = (await c.Mm.ListVmasAsync(new ListVmasRequest { MmId = mm })).Vmas.Count;

        var ex = await Assert.ThrowsAsync<RpcException>(async () => await c.Mm.MmapAsync(new MmapRequest { MmId = mm, Addr = B, Len = Page, Prot = 1 }));
        Assert.Equal(StatusCode.ResourceExhausted, ex.StatusCode);
        Assert.Contains("JournalEntriesPerMachine", ex.Status.Detail, StringComparison.Ordinal);
        Assert.Equal(vmas, (await c.Mm.ListVmasAsync(new ListVmasRequest { MmId = mm })).Vmas.Count);
        // Reads still answer, and the journal holds its 8 steps.
        var j = await c.Machines.ReadJournalAsync(new ReadJournalRequest { MachineId = machine });
        Assert.Equal(8, j.Steps);
        Assert.Equal(Enumerable.Range(1, 8).Select(i => (long)i), j.Entries.Select(e => e.Step));
        Assert.Equal(8, (await c.Machines.GetMachineAsync(new GetMachineRequest { MachineId = machine })).Machine.JournalSteps);
        await c.Machines.DestroyMachineAsync(new DestroyMachineRequest { MachineId = machine });
    }

    [Fact]
    public async Task Answers_count_against_the_journal_bytes_and_the_next_call_is_refused()
    {
        using var c = fx.NewClient();
        var machine = (await c.Machines.CreateMachineAsync(new CreateMachineRequest { Settings = new MachineSettings { Journal = true } })).Machine.MachineId;
        var mm = (await c.Mm.CreateMmAsync(new CreateMmRequest { MachineId = machine })).Mm.MmId;
        var t = (await c.Threads.CreateThreadAsync(new CreateThreadRequest { MmId = mm })).Thread.ThreadId;
        Assert.Equal(Errno.Unspecified, (await c.Mm.MmapAsync(new MmapRequest { MmId = mm, Addr = A, Len = 8 * Page, Prot = 3 })).Errno);
        // A 24 KiB read: its answer takes the journal past 20,000 bytes.
        var read = await c.Threads.AccessAsync(new AccessRequest { ThreadId = t, Access = new AccessOp { Addr = A, Span = new ByteSpan { Length = 6 * Page } } });
        Assert.Equal(6 * (int)Page, read.Result.Values.Length);

        var ex = await Assert.ThrowsAsync<RpcException>(async () => await c.Mm.MmapAsync(new MmapRequest { MmId = mm, Addr = B, Len = Page, Prot = 3 }));
        Assert.Equal(StatusCode.ResourceExhausted, ex.StatusCode);
        Assert.Contains("JournalBytesPerMachine", ex.Status.Detail, StringComparison.Ordinal);
        Assert.Equal(4, (await c.Machines.ReadJournalAsync(new ReadJournalRequest { MachineId = machine })).Steps);
        await c.Machines.DestroyMachineAsync(new DestroyMachineRequest { MachineId = machine });
    }
}

/// <summary>The CLI's session commands on a journal a random session left: replay in-process and against a server, a divergence, explore.</summary>
public sealed class JournalCliTests(ServerProcessFixture real) : IClassFixture<ServerProcessFixture>
{
    private static readonly string s_cli = Path.Combine(RepoRoot(), "src", "UffdGrpc.Cli", "bin", "Release", "net10.0", "UffdGrpc.Cli.dll");

    private static Task<(int Rc, string Output)> CliAsync(params string[] args) => RunAsync("dotnet", [s_cli, .. args], RepoRoot());

    [Fact]
    public async Task Session_export_replay_and_explore_from_the_command_line()
    {
        using var c = new UffdClient(real.Server.Address);
        var (journal, _) = await JournalTests.RecordRandomSessionAsync(c, 3);
        var dir = Directory.CreateTempSubdirectory("uffd-journal-").FullName;
        try
        {
            var file = Path.Combine(dir, "s3.journal");
            journal.Save(file);

            var (rc, text) = await CliAsync("session", "replay", file);
            Assert.True(rc == 0, text);
            Assert.Contains($"session: {journal.Entries.Count} steps replayed identically", text, StringComparison.Ordinal);
            (rc, text) = await CliAsync("session", "replay", file, "--server", real.Server.Address);
            Assert.True(rc == 0, text);

            // A journal whose last entry says another method ran: exit 1 and the step.
            var entries = journal.Entries.Select(e => e.Clone()).ToList();
            var last = entries.FindLastIndex(e => e.Method == "uffd.v1.UserfaultfdService/Close");
            entries[last].Response = new CloseResponse { Errno = Errno.Ebadf }.ToByteString();
            var bad = Path.Combine(dir, "bad.journal");
            new SessionJournal { Header = journal.Header, Entries = entries, End = journal.End }.Save(bad);
            (rc, text) = await CliAsync("session", "replay", bad);
            Assert.True(rc == 1, text);
            Assert.Contains($"DIVERGED at step {entries[last].Step} (uffd.v1.UserfaultfdService/Close): errno", text, StringComparison.Ordinal);

            (rc, text) = await CliAsync("explore", file, "--seeds", "3");
            Assert.True(rc == 0, text);
            Assert.Contains("explore: 3 seeds from 1:", text, StringComparison.Ordinal);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }
}
