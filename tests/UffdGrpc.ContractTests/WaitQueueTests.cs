using System.Diagnostics;
using Microsoft.Extensions.DependencyInjection;
using UffdGrpc.Server.Hosting;

namespace UffdGrpc.ContractTests;

/// <summary>
/// Readers sleep on their own uffd's wait queue (fs/userfaultfd.c fd_wqh): an idle server
/// with open handler streams uses no CPU, and a message wakes only the readers of its uffd.
/// </summary>
public sealed class WaitQueueTests(GrpcTestFixture fx) : IClassFixture<GrpcTestFixture>
{
    /// <summary>utime + stime of a process, from /proc/PID/stat (clock ticks, 100 per second).</summary>
    private static long CpuTicks(int pid)
    {
        var stat = File.ReadAllText($"/proc/{pid}/stat");
        var fields = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
        return long.Parse(fields[11], System.Globalization.CultureInfo.InvariantCulture) + long.Parse(fields[12], System.Globalization.CultureInfo.InvariantCulture);
    }

    [Fact]
    public async Task TwoHundredIdleStreamsCostUnderOnePercentOfACore()
    {
        await using var server = await ServerProcess.StartAsync();
        using var client = new UffdClient(server.Address);
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(120));
        // 10 machines x 20 uffds, one ReadEvents stream each: 200 handlers waiting for faults.
        var uffds = new List<long>();
        var machines = new List<long>();
        for (var m = 0; m < 10; m++)
        {
            var machine = (await client.CreateMachineAsync()).MachineId;
            machines.Add(machine);
            var mm = await client.CreateMmAsync(machine);
            for (var u = 0; u < 20; u++)
            {
                var (e, uffd) = await client.CreateUffdAsync(mm);
                Assert.True(e.IsOk());
                Assert.True((await client.ApiAsync(uffd)).Errno.IsOk());
                uffds.Add(uffd);
            }
        }
        var streams = uffds.Select(u => client.Uffd.ReadEvents(new ReadEventsRequest { UffdId = u }, cancellationToken: cts.Token)).ToList();
        try
        {
            foreach (var u in uffds)
                await EventuallyAsync(async () => (await client.PollAsync(u)).Readers == 1, $"uffd {u} has its reader");
            // Let the start-up tail settle (background tier-1 JIT of everything the set-up ran,
            // a gen0 GC): wait for a quiet second, at most 15 s.
            for (var k = 0; k < 15; k++)
            {
                var t0 = CpuTicks(server.Pid);
                await Task.Delay(1000);
                if (CpuTicks(server.Pid) - t0 <= 1)
                    break;
            }
            // A server that polls uses CPU in every window; a busy machine (the other test
            // projects run beside this one) can inflate one window's wakeups. The best of up to
            // three 5 s windows must be under 1 % of one core.
            var windows = new List<string>();
            var under = false;
            for (var w = 0; w < 3 && !under; w++)
            {
                var before = CpuTicks(server.Pid);
                var wall = Stopwatch.StartNew();
                await Task.Delay(TimeSpan.FromSeconds(5));
                var ticks = CpuTicks(server.Pid) - before;
                var seconds = wall.Elapsed.TotalSeconds;
                // 1 % of one core over the window, in ticks (100 Hz).
                var budget = 0.01 * seconds * 100;
                windows.Add($"{ticks} ticks ({ticks * 10} ms CPU) in {seconds:F1} s (budget {budget:F1} ticks)");
                under = ticks < budget;
            }
            Assert.True(under, $"the idle server with 200 open streams used, per window: {string.Join("; ", windows)}");
        }
        finally
        {
            foreach (var s in streams)
                s.Dispose();
        }
    }

    [Fact]
    public async Task AMessageWakesOnlyItsOwnUffdsReaders()
    {
        var c = fx.NewClient();
        await using var s = await Sandbox.CreateAsync(c, pages: 1, registerMode: 2);
        var (e, other) = await c.CreateUffdAsync(s.Mm);
        Assert.True(e.IsOk());
        Assert.True((await c.ApiAsync(other)).Errno.IsOk());
        var registry = fx.Services.GetRequiredService<MachineRegistry>();
        var mine = registry.Uffd(s.Uffd);
        var theirs = registry.Uffd(other);
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        using var a = c.Uffd.ReadEvents(new ReadEventsRequest { UffdId = s.Uffd }, cancellationToken: cts.Token);
        using var b = c.Uffd.ReadEvents(new ReadEventsRequest { UffdId = other }, cancellationToken: cts.Token);
        await EventuallyAsync(async () => (await c.PollAsync(s.Uffd)).Readers == 1 && (await c.PollAsync(other)).Readers == 1, "both readers are open");
        // Both readers are asleep: each has found its queue empty and waits on its own task.
        await EventuallyAsync(() => Task.FromResult(mine.Sleeping && theirs.Sleeping), "both readers sleep");
        var wakesA = mine.Wakeups;
        var wakesB = theirs.Wakeups;
        Assert.True((await c.WriteAsync(s.Thread, A, 0x11)).Errno.IsOk());
        Assert.True((await c.WriteprotectAsync(s.Uffd, A, Page, 1)).IsOk());
        var write = c.WriteAsync(s.Thread, A, 0x22);
        Assert.True(await a.ResponseStream.MoveNext(cts.Token));
        Assert.True(a.ResponseStream.Current.Msg.Pagefault.Wp);
        Assert.Equal(wakesA + 1, mine.Wakeups);
        Assert.Equal(wakesB, theirs.Wakeups);
        Assert.True((await c.WriteprotectAsync(s.Uffd, A, Page, 0)).IsOk());
        Assert.True((await write).Errno.IsOk());
        Assert.Equal(wakesB, theirs.Wakeups);
    }
}
