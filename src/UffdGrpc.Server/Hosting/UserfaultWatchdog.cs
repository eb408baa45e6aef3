using Google.Protobuf.WellKnownTypes;
using Grpc.Core;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Hosting;

/// <summary>The hung-userfault watchdog (off by default): configuration section "Watchdog".</summary>
public sealed class WatchdogOptions
{
    public const string Section = "Watchdog";

    /// <summary>
    /// A thread asleep in one userfault this many seconds gets SIGKILL (its process exits, its
    /// access ends aborted, later fills of its address space get ESRCH). 0: never, as in
    /// the kernel, where an open but silent handler leaves its threads asleep for good.
    /// </summary>
    public double UserfaultSeconds { get; set; }
}

/// <summary>
/// One machine's hung-userfault watchdog: a timer per simulated thread, armed (after the
/// machine lock is released) each time the thread goes to sleep in handle_userfault. When it
/// fires, the thread is killed only if it is still in that same sleep. Nothing polls: each
/// timer fires once per sleep, and a thread's entry goes when its timer finds it awake.
/// </summary>
/// <remarks>The timer map is protected by the machine's kernel lock.</remarks>
internal sealed class UserfaultWatchdog
{
    private readonly MachineHost _host;
    private readonly TimeSpan _timeout;
    private readonly ILogger _logger;
    private readonly Dictionary<Model.SimThread, (Timer Timer, object Sleep)> _timers = [];

    public UserfaultWatchdog(MachineHost host, TimeSpan timeout, ILogger logger)
    {
        _host = host;
        _timeout = timeout;
        _logger = logger;
        host.Kernel.UserfaultSleep += OnSleep;
    }

    /// <summary>Under the kernel lock: remember the sleep, arm the thread's timer once the lock is released.</summary>
    private void OnSleep(Model.SimThread t, object sleep)
    {
        if (!_timers.TryGetValue(t, out var e))
            e.Timer = new Timer(static s => ((Action)s!)(), (Action)(() => Fire(t)), Timeout.Infinite, Timeout.Infinite);
        _timers[t] = (e.Timer, sleep);
        var timer = e.Timer;
        _host.Kernel.DeferUntilUnlocked(() => timer.Change(_timeout, Timeout.InfiniteTimeSpan));
    }

    private void Fire(Model.SimThread t)
    {
        if (_host.Destroyed || _host.Broken is not null)
            return;
        var previous = JournalCall.Current;
        // On a journaled machine the kill is a step of its own.
        JournalCall.Current = _host.Journal is null ? null : new JournalCall(JournalCall.WatchdogKillMethod, new Empty());
        try
        {
            var killed = _host.Run(() =>
            {
                if (!_timers.TryGetValue(t, out var e))
                    return false;
                var dead = _host.Kernel.KillUserfaultSleeper(t, e.Sleep);
                if (dead || t.State != Model.ThreadState.BlockedInUserfault)
                {
                    // Awake (or dead): forget the thread until its next sleep.
                    _timers.Remove(t);
                    e.Timer.Dispose();
                }
                if (!dead)
                    _host.Journal?.Retract(JournalCall.Current!);
                return dead;
            });
            if (killed)
                Log.WatchdogKilled(_logger, _host.Id, t.Tid, _timeout.TotalSeconds);
        }
        catch (RpcException)
        {
            // The machine broke or went away meanwhile.
        }
        finally
        {
            JournalCall.Current?.Answer(null, 0, "");
            JournalCall.Current = previous;
        }
    }

    /// <summary>Stops every timer (the machine is gone). Caller holds the kernel lock.</summary>
    public void Stop()
    {
        foreach (var (timer, _) in _timers.Values)
            timer.Dispose();
        _timers.Clear();
    }
}
