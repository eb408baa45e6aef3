using System.Globalization;
using UffdGrpc.Mm;
using static UffdGrpc.Scenarios.ScenarioParsing;

namespace UffdGrpc.Scenarios;

/// <summary>The scenario stopped the way kuffd stops: a watchdog timeout (exit status 2).</summary>
public sealed class ScenarioTimeoutException : Exception
{
    public ScenarioTimeoutException()
        : base("TIMEOUT scenario watchdog")
    {
    }

    public ScenarioTimeoutException(string message)
        : base(message)
    {
    }

    public ScenarioTimeoutException(string message, Exception inner)
        : base(message, inner)
    {
    }
}

/// <summary>
/// Replays the scenario language of shared/conformance (kuffd.c) against an
/// <see cref="IKernelBackend"/> and prints the same trace. The harness's threads (main,
/// worker, handler, child) become a deterministic loop: run a command, then settle —
/// start queued executor commands, let the handler read and resolve messages, print
/// results — until nothing changes, then print the <c>blocked</c> lines.
/// </summary>
public sealed partial class ScenarioInterpreter
{
    /// <summary>Where named mappings start: 1 GiB aligned, each in its own 2 MiB slot.</summary>
    public const ulong ArenaBase = 0x7e00_0000_0000;
    private const ulong PmdSize = 2UL << 20;
    private const ulong Pg = Kernel.PageSize;
    private const long Untouched = 0x7eadbeef;

    private readonly IKernelBackend _k;
    private readonly TextWriter _out;
    private readonly List<Mapping> _maps = [];
    private readonly List<UffdEnt> _uffds = [];
    private readonly Dictionary<ulong, int> _labels = [];
    private readonly List<string> _handlerQueue = [];
    private readonly List<ThreadOpResult> _deferred = [];
    private ulong _arenaNext = ArenaBase;
    private int _cur = -1;
    private Policy _policy;
    private byte _policyByte;
    private bool _deferHandler;
    private bool _mapped;
    private int _mainProc;
    private int _mainThread;
    private int _mainTid;
    private Executor _worker = null!;
    private Executor _child = null!;

    public ScenarioInterpreter(IKernelBackend backend, TextWriter output)
    {
        _k = backend;
        _out = output;
    }

    [Flags]
    private enum Policy
    {
        None = 0,
        Off = 1,
        Unwp = 2,
        Copy = 4,
        CopyWp = 8,
        Zero = 16,
        Cont = 32,
        ContWp = 64,
        Wake = 128,
    }

    private sealed class Mapping
    {
        public required string Name;
        public ulong Base;
        public ulong Len;
        public int File;
        public bool Shared;
        public ulong Off;
    }

    private sealed class UffdEnt
    {
        public int Handle;
        public bool Open;
        public bool ApiDone;
        public bool Blocking;
        public ulong Features;
    }

    private sealed class Executor(string label)
    {
        public readonly string Label = label;
        public readonly Queue<string> Pending = new();
        public bool Alive;
        public bool IsChild;
        public int Process;
        public int Thread;
        public int Tid;
        public string? Current;
        public long CurrentOp;
        public bool BlockedReported;
        public string CurOp = "";
        /// <summary>Result lines written by the executor that main has not printed yet (kuffd's result pipe).</summary>
        public readonly List<string> Pipe = [];
        /// <summary>The slots main named for this executor's queued mremaps (kuffd's "@ADDR" word, child_mremap_send).</summary>
        public readonly Queue<ulong> RemapAddrs = new();
        public int PendingCount => Pending.Count + (Current is null ? 0 : 1);
    }

    /// <summary>Runs a whole script; returns the exit status kuffd would (0, or 2 on a watchdog timeout).</summary>
    public async Task<int> RunAsync(TextReader script)
    {
        _mainProc = await _k.CreateProcessAsync().ConfigureAwait(false);
        (_mainThread, _mainTid) = await _k.CreateThreadAsync(_mainProc).ConfigureAwait(false);
        var (wt, wtid) = await _k.CreateThreadAsync(_mainProc).ConfigureAwait(false);
        _worker = new Executor("worker") { Alive = true, Process = _mainProc, Thread = wt, Tid = wtid };
        _child = new Executor("child");
        try
        {
            string? line;
            while ((line = await script.ReadLineAsync().ConfigureAwait(false)) is not null)
            {
                if (!await RunLineAsync(line).ConfigureAwait(false))
                    return 0;
            }
            FlushHandlerQueue();
            if (_child.Alive)
                await ReapChildAsync(kill: true).ConfigureAwait(false);
            return 0;
        }
        catch (ScenarioTimeoutException e)
        {
            FlushHandlerQueue();
            Emit(e.Message);
            return 2;
        }
    }

    private void Emit(string line) => _out.Write(line + "\n");

    private void HandlerOut(string line)
    {
        if (_deferHandler)
            _handlerQueue.Add(line);
        else
            Emit(line);
    }

    private void FlushHandlerQueue()
    {
        foreach (var l in _handlerQueue)
            Emit(l);
        _handlerQueue.Clear();
    }

    private static string[] Split(string line) =>
        line.Split([' ', '\t', '\r', '\n'], StringSplitOptions.RemoveEmptyEntries);

    /// <summary>run_line: echo, run, settle. Returns false when the script stops (SKIP).</summary>
    private async Task<bool> RunLineAsync(string line)
    {
        var argv = Split(line);
        if (argv.Length == 0 || argv[0][0] == '#')
            return true;
        var echo = string.Join(' ', argv);
        var op = argv[0];
        if (op == "uffd" && argv.Length > 1 && argv[1] == "close")
        {
            var id = argv.Length > 2 ? Atoi(argv[2][(argv[2][0] == 'u' ? 1 : 0)..]) : _cur;
            if (id >= 0 && id < _uffds.Count)
                _uffds[id].Open = false;
        }
        Emit("> " + echo);
        _deferHandler = true;
        var go = true;
        try
        {
            go = await RunMainCommandAsync(argv, echo).ConfigureAwait(false);
        }
        finally
        {
            _deferHandler = false;
        }
        FlushHandlerQueue();
        if (!go)
            return false;
        await SettleAsync().ConfigureAwait(false);
        return true;
    }

    private async Task<bool> RunMainCommandAsync(string[] argv, string echo)
    {
        var op = argv[0];
        if (op is "child:" or "child")
        {
            if (argv.Length >= 2 && argv[1] == "kill")
            {
                await ReapChildAsync(kill: true).ConfigureAwait(false);
            }
            else if (argv.Length >= 2 && argv[1] == "exit")
            {
                if (_child.Alive)
                    Send(_child, "exit");
                _deferHandler = false;
                FlushHandlerQueue();
                await SettleAsync().ConfigureAwait(false);
                _deferHandler = true;
                if (_child.Alive && _child.PendingCount > 0)
                    throw new ScenarioTimeoutException();
                await ReapChildAsync(kill: false).ConfigureAwait(false);
            }
            else if (!_child.Alive)
            {
                Emit("USAGE no child");
            }
            else if (argv.Length >= 2 && argv[1] == "mremap")
            {
                ChildMremapSend(argv);
            }
            else
            {
                Send(_child, string.Join(' ', argv.Skip(1)));
            }
            return true;
        }
        switch (op)
        {
            case "async":
                Send(_worker, string.Join(' ', argv.Skip(1)));
                return true;
            case "write" or "read" or "kwrite" or "kread" or "populate" or "pvread" or "pvwrite":
                Send(_worker, echo);
                return true;
            case "map":
                await CmdMapAsync(argv).ConfigureAwait(false);
                return true;
            case "alias":
                await CmdAliasAsync(argv).ConfigureAwait(false);
                return true;
            case "mremap":
                await CmdMremapAsync(argv).ConfigureAwait(false);
                return true;
            case "uffd":
                await CmdUffdAsync(argv).ConfigureAwait(false);
                return true;
            case "register":
                await CmdRegisterAsync(argv).ConfigureAwait(false);
                return true;
            case "unregister":
                await CmdUnregisterAsync(argv).ConfigureAwait(false);
                return true;
            case "fork":
                await CmdForkAsync().ConfigureAwait(false);
                return true;
            case "poke":
                await CmdPokeAsync(argv).ConfigureAwait(false);
                return true;
            case "handler":
                CmdHandler(argv);
                return true;
            case "inject":
                await CmdInjectAsync(argv).ConfigureAwait(false);
                return true;
            case "require":
                return await CmdRequireAsync(argv).ConfigureAwait(false);
            default:
                var lines = await RunCommonAsync(argv, null, _mainProc).ConfigureAwait(false);
                if (lines is null)
                    Emit("USAGE unknown command: " + op);
                else
                    foreach (var l in lines)
                        Emit(l);
                return true;
        }
    }

    // ------------------------------------------------------------------ settle

    private void Send(Executor ex, string line)
    {
        ex.Pending.Enqueue(line);
        ex.BlockedReported = false;
        ex.CurOp = line;
    }

    /// <summary>
    /// settle(): until nothing changes, finish completed executor operations (their result
    /// lines go to the executor's pipe), start queued executor commands, and let the
    /// handler read one message per open non-blocking uffd per round. Executors and the
    /// handler run ahead of main, so main prints the pipes (worker first, as kuffd drains
    /// them) once they are idle: an event raised by a command queued behind a finished
    /// one comes before that finished command's result. Then "blocked" lines.
    /// </summary>
    private async Task SettleAsync()
    {
        for (var rounds = 0; ; rounds++)
        {
            var progress = await DrainAndPumpAsync().ConfigureAwait(false);
            if (!_policy.HasFlag(Policy.Off))
                progress |= await HandlerRoundAsync(resolve: true).ConfigureAwait(false);
            if (!progress)
                break;
            if (rounds == MaxSettleRounds)
            {
                // kuffd gives up settling after 20 s (e.g. a handler whose ZEROPAGE keeps
                // getting EEXIST on a uffd-wp marker, waking a fault that recurs forever).
                FlushPipes();
                Emit("TIMEOUT settling");
                break;
            }
        }
        FlushPipes();
        foreach (var ex in new[] { _worker, _child })
        {
            if (ex.Alive && ex.PendingCount > 0 && !ex.BlockedReported)
            {
                Emit($"{ex.Label}: {ex.CurOp} blocked");
                ex.BlockedReported = true;
            }
        }
    }

    /// <summary>Main drains the executors' result pipes, worker first.</summary>
    private void FlushPipes()
    {
        foreach (var ex in new[] { _worker, _child })
        {
            foreach (var l in ex.Pipe)
                Emit($"{ex.Label}: {l}");
            ex.Pipe.Clear();
        }
    }

    /// <summary>Handler rounds after which settling gives up, as kuffd's 20 s settle deadline does.</summary>
    private const int MaxSettleRounds = 20000;

    private async Task<bool> DrainAndPumpAsync()
    {
        var any = false;
        while (true)
        {
            var step = false;
            var done = _deferred.ToList();
            _deferred.Clear();
            done.AddRange(await _k.TakeCompletionsAsync().ConfigureAwait(false));
            foreach (var r in done)
            {
                step = true;
                await OnCompletionAsync(r).ConfigureAwait(false);
            }
            foreach (var ex in new[] { _worker, _child })
                step |= await PumpAsync(ex).ConfigureAwait(false);
            if (!step)
                return any;
            any = true;
        }
    }

    private async Task OnCompletionAsync(ThreadOpResult r)
    {
        foreach (var ex in new[] { _worker, _child })
        {
            if (ex.Current is not null && ex.CurrentOp == r.OpId)
            {
                var cmd = ex.Current;
                ex.Current = null;
                if (!r.Aborted)
                    ex.Pipe.AddRange(await FormatOpResultAsync(Split(cmd), r).ConfigureAwait(false));
                return;
            }
        }
    }

    /// <summary>Starts queued commands on an idle executor; returns true if any ran.</summary>
    private async Task<bool> PumpAsync(Executor ex)
    {
        var ran = false;
        while (ex.Alive && ex.Current is null && ex.Pending.Count > 0)
        {
            ran = true;
            var line = ex.Pending.Dequeue();
            var argv = Split(line);
            if (argv.Length == 0)
                continue;
            if (argv[0] == "exit")
            {
                await _k.EndProcessAsync(ex.Process, kill: false).ConfigureAwait(false);
                ex.Alive = false;
                ex.Pending.Clear();
                return true;
            }
            var req = ThreadOpFor(argv, ex);
            if (req is not null)
            {
                ex.Current = line;
                ex.CurrentOp = await _k.StartAsync(ex.Thread, req).ConfigureAwait(false);
                continue;
            }
            ex.Pipe.AddRange(await RunOnExecutorAsync(argv, ex).ConfigureAwait(false));
        }
        return ran;
    }

    /// <summary>Runs a thread operation on main and waits for it the way kuffd's main blocks in the syscall.</summary>
    private async Task<ThreadOpResult> RunOnMainAsync(ThreadOpRequest req)
    {
        var id = await _k.StartAsync(_mainThread, req).ConfigureAwait(false);
        while (true)
        {
            ThreadOpResult? mine = null;
            foreach (var r in await _k.TakeCompletionsAsync().ConfigureAwait(false))
            {
                if (r.OpId == id)
                    mine = r;
                else
                    _deferred.Add(r);
            }
            if (mine is not null)
                return mine;
            if (_policy.HasFlag(Policy.Off) || !await HandlerRoundAsync(resolve: true).ConfigureAwait(false))
                throw new ScenarioTimeoutException();
        }
    }

    // ------------------------------------------------------------------ handler

    /// <summary>One pass of handler_main: one message from each open, initialised, non-blocking uffd.</summary>
    private async Task<bool> HandlerRoundAsync(bool resolve)
    {
        var any = false;
        var n = _uffds.Count;
        for (var i = 0; i < n; i++)
        {
            var u = _uffds[i];
            if (!u.Open || !u.ApiDone || u.Blocking)
                continue;
            var (e, m) = await _k.ReadAsync(u.Handle).ConfigureAwait(false);
            if (e != Errno.OK || m is null)
                continue;
            any = true;
            await HandleMsgAsync(i, m, resolve, HandlerOut).ConfigureAwait(false);
            if (m.Event == UffdEvent.Fork)
                break;
        }
        return any;
    }

    private string WhoTid(uint t)
    {
        if (t == 0)
            return "";
        if (t == (uint)_worker.Tid)
            return " tid=worker";
        if (_child.Tid != 0 && t == (uint)_child.Tid)
            return " tid=child";
        if (t == (uint)_mainTid)
            return " tid=main";
        return " tid=other";
    }

    /// <summary>handle_msg: prints the message and applies the first policy action that fits.</summary>
    private async Task HandleMsgAsync(int uid, UffdMessage m, bool resolve, Action<string> put)
    {
        var fd = _uffds[uid].Handle;
        switch (m.Event)
        {
            case UffdEvent.Pagefault:
                {
                    var fl = (ulong)m.Flags;
                    var parts = new List<string>();
                    if ((fl & 1) != 0)
                        parts.Add("WRITE");
                    if ((fl & 2) != 0)
                        parts.Add("WP");
                    if ((fl & 4) != 0)
                        parts.Add("MINOR");
                    if ((fl & ~7UL) != 0)
                        parts.Add(AltHex(fl & ~7UL));
                    var fls = parts.Count == 0 ? "0" : string.Join('|', parts);
                    put($"event u{uid} pagefault {AddrName(m.Address)} flags={fls}{WhoTid(m.Ptid)}");
                    _worker.BlockedReported = false;
                    _child.BlockedReported = false;
                    var pg = m.Address & ~(Pg - 1);
                    var a = AddrName(pg);
                    var pol = resolve ? _policy : Policy.None;
                    if ((fl & 2) != 0 && pol.HasFlag(Policy.Unwp))
                    {
                        var r = await _k.WriteprotectAsync(fd, pg, Pg, 0).ConfigureAwait(false);
                        put($"handler u{uid} unwp {a}: {r.Name()}");
                    }
                    else if ((fl & 4) != 0 && (pol & (Policy.Cont | Policy.ContWp)) != 0)
                    {
                        var wp = pol.HasFlag(Policy.ContWp);
                        var r = await _k.ContinueAsync(fd, pg, Pg, wp ? Uapi.ContinueModeWp : 0).ConfigureAwait(false);
                        put($"handler u{uid} continue{(wp ? " wp" : "")} {a}: {r.Errno.Name()} mapped={r.Field ?? Untouched}");
                    }
                    else if ((fl & 6) == 0 && (pol & (Policy.Copy | Policy.CopyWp | Policy.Zero)) != 0)
                    {
                        Errno e;
                        if (pol.HasFlag(Policy.Zero))
                        {
                            e = (await _k.ZeropageAsync(fd, pg, Pg, 0).ConfigureAwait(false)).Errno;
                            put($"handler u{uid} zeropage {a}: {e.Name()}");
                        }
                        else
                        {
                            var wp = pol.HasFlag(Policy.CopyWp);
                            e = (await _k.CopyAsync(fd, pg, HandlerPageAddr, _policyByte, Pg, wp ? Uapi.CopyModeWp : 0).ConfigureAwait(false)).Errno;
                            put($"handler u{uid} copy{(wp ? " wp" : "")} {a} {AltHex(_policyByte)}: {e.Name()}");
                        }
                        if (e == Errno.EEXIST)
                        {
                            var r = await _k.WakeAsync(fd, pg, Pg).ConfigureAwait(false);
                            put($"handler u{uid} wake {a}: {r.Name()}");
                        }
                    }
                    else if (pol.HasFlag(Policy.Wake))
                    {
                        var r = await _k.WakeAsync(fd, pg, Pg).ConfigureAwait(false);
                        put($"handler u{uid} wake {a}: {r.Name()}");
                    }
                    break;
                }
            case UffdEvent.Fork:
                {
                    var id = _uffds.Count;
                    _uffds.Add(new UffdEnt { Handle = m.ForkUffd, Open = true, ApiDone = true, Features = _uffds[uid].Features });
                    put($"event u{uid} fork -> u{id}");
                    break;
                }
            case UffdEvent.Remap:
                put($"event u{uid} remap {AddrName(m.From)} -> {AddrName(m.To)} pages={m.Len / Pg}");
                break;
            case UffdEvent.Remove:
            case UffdEvent.Unmap:
                put($"event u{uid} {(m.Event == UffdEvent.Remove ? "remove" : "unmap")} {AddrName(m.From)} pages={(m.To - m.From) / Pg}");
                break;
            default:
                put($"event u{uid} unknown {AltHex((ulong)m.Event)}");
                break;
        }
    }

    /// <summary>The address of kuffd's static handler page (a source buffer outside the arena).</summary>
    private const ulong HandlerPageAddr = 0x5555_5555_0000;

    /// <summary>The address of kuffd's 64 MiB copy source buffer.</summary>
    private const ulong SrcBufAddr = 0x7f00_0000_0000;

    // ------------------------------------------------------------------ names

    private Mapping? FindMap(string name) => _maps.Find(m => m.Name == name);

    /// <summary>addr_name: "NAME PAGE[+OFF]" after the latest mapping holding it.</summary>
    private string AddrName(ulong a)
    {
        for (var i = _maps.Count - 1; i >= 0; i--)
        {
            var m = _maps[i];
            if (a >= m.Base && a < m.Base + m.Len)
            {
                var d = a - m.Base;
                return d % Pg != 0
                    ? $"{m.Name} {d / Pg}+{d % Pg}"
                    : $"{m.Name} {d / Pg}";
            }
        }
        for (var i = _maps.Count - 1; i >= 0; i--)
        {
            if (a == _maps[i].Base + _maps[i].Len)
                return $"{_maps[i].Name} {_maps[i].Len / Pg}";
        }
        return a == 0 ? "0" : "?" + AltHex(a);
    }

    private bool ParseLoc(string name, string pg, out ulong addr, out Mapping? map)
    {
        addr = 0;
        map = FindMap(name);
        if (map is null || !ParsePages(pg, out var off))
            return false;
        addr = map.Base + off;
        return true;
    }

    private bool GetRange(string[] argv, int i, out ulong start, out ulong len)
    {
        start = len = 0;
        if (argv.Length < i + 3)
            return false;
        if (!ParseLoc(argv[i], argv[i + 1], out start, out _))
            return false;
        return ParsePages(argv[i + 2], out len);
    }

    private static bool HasWord(string[] argv, int from, string w)
    {
        for (var i = from; i < argv.Length; i++)
        {
            if (argv[i] == w)
                return true;
        }
        return false;
    }

    private int CurHandle() => _cur >= 0 && _cur < _uffds.Count && _uffds[_cur].Open ? _uffds[_cur].Handle : -1;

    private int PfnLabel(ulong pfn)
    {
        if (_labels.TryGetValue(pfn, out var l))
            return l;
        l = _labels.Count + 1;
        _labels[pfn] = l;
        return l;
    }

    private static string Inv(ulong v) => v.ToString(CultureInfo.InvariantCulture);

    private static string Inv(long v) => v.ToString(CultureInfo.InvariantCulture);
}
