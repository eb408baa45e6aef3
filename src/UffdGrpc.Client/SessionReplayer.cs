using System.Collections;
using System.Globalization;
using Google.Protobuf;
using Google.Protobuf.Reflection;
using Grpc.Core;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Client;

/// <summary>Where a replay first differed from its journal.</summary>
public sealed record ReplayDivergence(long Step, string Method, string What)
{
    public override string ToString() => $"step {Step} ({Method}): {What}";
}

/// <summary>The outcome of a replay: the divergences in step order (none: identical) and the replayed machine's state digest.</summary>
public sealed record ReplayReport(long Steps, long MachineId, byte[] StateDigest, IReadOnlyList<ReplayDivergence> Divergences)
{
    public bool Identical => Divergences.Count == 0;
    public ReplayDivergence? First => Divergences.Count > 0 ? Divergences[0] : null;
}

/// <summary>
/// Re-executes a session journal against a server: a fresh journaled machine from the
/// journal's CreateMachine request, then every entry's call in step order, each issued once
/// the server has run the one before (the step in its response headers: a call that sleeps
/// is left pending, as its thread is). Ids are the server's own, so the replay learns the
/// map from recorded ids to new ones from the answers and rewrites every *_id field of the
/// requests. It checks each call's step, status and answer (ids through the map; the
/// principal fields owner and grantees aside), then the number of steps and the machine's
/// state digest. The first divergence names its step.
/// </summary>
public sealed class SessionReplayer(UffdClient client)
{
    private const string StepHeader = "uffd-journal-step";
    /// <summary>Steps the server takes by itself (a long operation's continuation, the watchdog's kill): a replay waits for them.</summary>
    private const string Internal = "uffd.v1.internal/";
    private static readonly TimeSpan s_answerWait = TimeSpan.FromSeconds(30);

    private static readonly Dictionary<string, MethodDescriptor> s_methods =
        new[] { MachineReflection.Descriptor, MmReflection.Descriptor, ThreadReflection.Descriptor, UserfaultfdReflection.Descriptor, InjectReflection.Descriptor }
            .SelectMany(f => f.Services).SelectMany(s => s.Methods).ToDictionary(m => m.Service.FullName + "/" + m.Name, StringComparer.Ordinal);

    private static readonly Marshaller<byte[]> s_raw = Marshallers.Create(b => b, b => b);

    private readonly Dictionary<long, long> _ids = [];
    private readonly HashSet<long> _mapped = [];
    private readonly List<ReplayDivergence> _divergences = [];

    /// <summary>Replays under this schedule seed instead of the journal's (exploration: answers are then not compared).</summary>
    public ulong? ScheduleSeed { get; init; }

    /// <summary>Destroy the replayed machine at the end (default).</summary>
    public bool DestroyMachine { get; init; } = true;

    private bool Checking => ScheduleSeed is null;

    private sealed record Pending(JournalEntry Entry, MethodDescriptor Method, AsyncUnaryCall<byte[]> Call)
    {
        public bool Checked { get; set; }
    }

    public async Task<ReplayReport> ReplayAsync(SessionJournal journal, CancellationToken ct = default)
    {
        ArgumentNullException.ThrowIfNull(journal);
        var create = journal.CreateRequest;
        create.Settings ??= new MachineSettings();
        create.Settings.Journal = true;
        if (ScheduleSeed is { } seed)
            create.Settings.ScheduleSeed = seed;
        var created = await client.Machines.CreateMachineAsync(create, cancellationToken: ct).ConfigureAwait(false);
        CompareAnswer(0, "uffd.v1.MachineService/CreateMachine", CreateMachineResponse.Parser.ParseFrom(journal.Header.CreateMachineResponse), created);
        var machineId = created.Machine.MachineId;
        var pending = new List<Pending>();
        try
        {
            foreach (var e in journal.Entries)
            {
                if (!await RunStepAsync(machineId, e, pending, ct).ConfigureAwait(false))
                    break;
                CheckAnswered(pending);
            }
            await SettleAsync(pending, ct).ConfigureAwait(false);
            var end = await client.Machines.ReadJournalAsync(new ReadJournalRequest { MachineId = machineId, FromStep = long.MaxValue, StateDigest = true }, cancellationToken: ct).ConfigureAwait(false);
            if (_divergences.Count == 0 && end.Steps != journal.End.Steps)
                Diverge(end.Steps, "(end)", $"{end.Steps} steps where the journal has {journal.End.Steps}");
            if (_divergences.Count == 0 && !end.StateDigest.Equals(journal.End.StateDigest))
                Diverge(journal.End.Steps, "(end)", $"state digest {Hex(end.StateDigest)} where the journal has {Hex(journal.End.StateDigest)}");
            return new ReplayReport(end.Steps, machineId, end.StateDigest.ToByteArray(), [.. _divergences.OrderBy(d => d.Step)]);
        }
        finally
        {
            foreach (var p in pending)
                p.Call.Dispose();
            if (DestroyMachine)
            {
                try
                {
                    await client.Machines.DestroyMachineAsync(new DestroyMachineRequest { MachineId = machineId }, cancellationToken: ct).ConfigureAwait(false);
                }
                catch (RpcException)
                {
                    // Gone already (the server stops): nothing to free.
                }
            }
        }
    }

    /// <summary>Issues one entry's call and waits until the server has run it; false when the replay cannot go on.</summary>
    private async Task<bool> RunStepAsync(long machineId, JournalEntry e, List<Pending> pending, CancellationToken ct)
    {
        if (e.Method.StartsWith(Internal, StringComparison.Ordinal))
        {
            // Not a call: the server takes the step by itself; wait for it to.
            var r = await client.Machines.ReadJournalAsync(new ReadJournalRequest { MachineId = machineId, FromStep = e.Step, MaxEntries = 1, Wait = true }, cancellationToken: ct).ConfigureAwait(false);
            if (r.Entries[0].Method != e.Method)
                return Diverge(e.Step, e.Method, $"the server ran {r.Entries[0].Method} as this step");
            return true;
        }
        if (!s_methods.TryGetValue(e.Method, out var md))
            return Diverge(e.Step, e.Method, "not a method of uffd.v1");
        var request = md.InputType.Parser.ParseFrom(e.Request);
        if (!await MapRequestAsync(request, pending).ConfigureAwait(false))
            return Diverge(e.Step, e.Method, "names an id no earlier answer gave");
        var method = new Method<byte[], byte[]>(MethodType.Unary, md.Service.FullName, md.Name, s_raw, s_raw);
        var call = client.Channel.CreateCallInvoker().AsyncUnaryCall(method, null, new CallOptions(cancellationToken: ct), request.ToByteArray());
        var p = new Pending(e, md, call);
        pending.Add(p);
        string? step;
        try
        {
            step = (await call.ResponseHeadersAsync.ConfigureAwait(false)).GetValue(StepHeader);
        }
        catch (RpcException ex)
        {
            return Diverge(e.Step, e.Method, $"ended {ex.StatusCode} before the model ran it ({ex.Status.Detail})");
        }
        if (step is null)
        {
            var status = call.ResponseAsync.IsCompleted ? call.GetStatus().StatusCode.ToString() : "pending";
            return Diverge(e.Step, e.Method, $"the model did not run it (status {status})");
        }
        if (long.Parse(step, CultureInfo.InvariantCulture) != e.Step && Checking)
            return Diverge(e.Step, e.Method, $"ran as step {step}");
        return true;
    }

    /// <summary>Compares every answered call not yet compared.</summary>
    private void CheckAnswered(List<Pending> pending)
    {
        foreach (var p in pending)
        {
            if (!p.Checked && p.Call.ResponseAsync.IsCompleted)
                CheckAnswer(p);
        }
    }

    private void CheckAnswer(Pending p)
    {
        p.Checked = true;
        var e = p.Entry;
        if (!e.Completed)
        {
            Diverge(e.Step, e.Method, "answered, where the journal's call was still asleep");
            return;
        }
        var task = p.Call.ResponseAsync;
        if (task.IsFaulted && task.Exception?.InnerException is RpcException ex)
        {
            if ((int)ex.StatusCode != e.StatusCode)
                Diverge(e.Step, e.Method, $"ended {ex.StatusCode} where the journal has {(StatusCode)e.StatusCode}");
            return;
        }
        if (!task.IsCompletedSuccessfully)
        {
            Diverge(e.Step, e.Method, "failed: " + task.Exception?.InnerException?.Message);
            return;
        }
        if (e.StatusCode != 0)
        {
            Diverge(e.Step, e.Method, $"answered OK where the journal has {(StatusCode)e.StatusCode}");
            return;
        }
        CompareAnswer(e.Step, e.Method, p.Method.OutputType.Parser.ParseFrom(e.Response), p.Method.OutputType.Parser.ParseFrom(task.Result));
    }

    /// <summary>At the end: every call the journal saw answered is answered; the others still sleep (they are then cancelled).</summary>
    private async Task SettleAsync(List<Pending> pending, CancellationToken ct)
    {
        foreach (var p in pending.Where(p => !p.Checked && p.Entry.Completed))
        {
            try
            {
                await p.Call.ResponseAsync.WaitAsync(s_answerWait, ct).ConfigureAwait(false);
            }
            catch (TimeoutException)
            {
                Diverge(p.Entry.Step, p.Entry.Method, $"no answer within {s_answerWait.TotalSeconds} s, where the journal has one");
                p.Checked = true;
                continue;
            }
            catch (RpcException)
            {
                // Compared below.
            }
            CheckAnswer(p);
        }
        CheckAnswered(pending);
    }

    /// <summary>Rewrites the request's ids to the replay's; waits for earlier answers when one is not known yet.</summary>
    private async Task<bool> MapRequestAsync(IMessage request, List<Pending> pending)
    {
        while (!TryMapIds(request))
        {
            var waiting = pending.Where(p => !p.Checked && p.Entry.Completed).Select(p => (Task)p.Call.ResponseAsync).ToList();
            if (waiting.Count == 0)
                return false;
            try
            {
                await Task.WhenAny(waiting).WaitAsync(s_answerWait).ConfigureAwait(false);
            }
            catch (TimeoutException)
            {
                return false;
            }
            CheckAnswered(pending);
        }
        return true;
    }

    private static bool IsId(FieldDescriptor f) =>
        f.FieldType == FieldType.Int64 && (f.Name.EndsWith("_id", StringComparison.Ordinal) || f.Name.EndsWith("_ids", StringComparison.Ordinal));

    /// <summary>Maps every id of <paramref name="m"/> in place; false (nothing changed) when one has no mapping yet.</summary>
    private bool TryMapIds(IMessage m)
    {
        if (!AllMapped(m))
            return false;
        MapIds(m);
        return true;
    }

    private bool AllMapped(IMessage m) => m.Descriptor.Fields.InFieldNumberOrder().All(f =>
        IsId(f) ? Ids(f, m).All(id => id == 0 || _ids.ContainsKey(id)) : Children(f, m).All(AllMapped));

    private void MapIds(IMessage m)
    {
        foreach (var f in m.Descriptor.Fields.InFieldNumberOrder())
        {
            if (!IsId(f))
            {
                foreach (var c in Children(f, m))
                    MapIds(c);
            }
            else if (f.IsRepeated)
            {
                var list = (IList)f.Accessor.GetValue(m);
                for (var i = 0; i < list.Count; i++)
                    list[i] = _ids[(long)list[i]!];
            }
            else if ((long)f.Accessor.GetValue(m) is var id and not 0)
            {
                f.Accessor.SetValue(m, _ids[id]);
            }
        }
    }

    private static IEnumerable<long> Ids(FieldDescriptor f, IMessage m) =>
        f.IsRepeated ? ((IList)f.Accessor.GetValue(m)).Cast<long>() : [(long)f.Accessor.GetValue(m)];

    private static IEnumerable<IMessage> Children(FieldDescriptor f, IMessage m)
    {
        if (f.FieldType != FieldType.Message || f.IsMap)
            return [];
        var v = f.Accessor.GetValue(m);
        return f.IsRepeated ? ((IList)v).Cast<IMessage>() : v is IMessage c ? [c] : [];
    }

    private void CompareAnswer(long step, string method, IMessage recorded, IMessage replayed)
    {
        if (Compare(recorded, replayed, "") is { } what && Checking)
            Diverge(step, method, what);
    }

    /// <summary>The first difference between two messages of one type (ids through the learned map), or null.</summary>
    private string? Compare(IMessage a, IMessage b, string path)
    {
        foreach (var f in a.Descriptor.Fields.InFieldNumberOrder())
        {
            var at = path.Length == 0 ? f.Name : path + "." + f.Name;
            if (f.Name is "owner" or "grantees")
                continue;
            if (IsId(f))
            {
                var x = Ids(f, a).ToList();
                var y = Ids(f, b).ToList();
                if (x.Count != y.Count)
                    return $"{at}: {y.Count} ids where the journal has {x.Count}";
                for (var i = 0; i < x.Count; i++)
                {
                    if (!Learn(x[i], y[i]))
                        return $"{at}: id {y[i]} does not stand for the journal's {x[i]}";
                }
                continue;
            }
            var va = f.Accessor.GetValue(a);
            var vb = f.Accessor.GetValue(b);
            if (f.FieldType == FieldType.Message && !f.IsMap)
            {
                var ca = Children(f, a).ToList();
                var cb = Children(f, b).ToList();
                if (ca.Count != cb.Count)
                    return $"{at}: {cb.Count} where the journal has {ca.Count}";
                for (var i = 0; i < ca.Count; i++)
                {
                    if (Compare(ca[i], cb[i], f.IsRepeated ? $"{at}[{i}]" : at) is { } d)
                        return d;
                }
                continue;
            }
            var same = f.IsRepeated || f.IsMap
                ? ((IEnumerable)va).Cast<object>().SequenceEqual(((IEnumerable)vb).Cast<object>())
                : Equals(va, vb);
            if (!same)
                return $"{at}: {Show(vb)} where the journal has {Show(va)}";
        }
        return null;
    }

    private bool Learn(long recorded, long replayed)
    {
        if (recorded == 0 || replayed == 0)
            return recorded == replayed;
        if (_ids.TryGetValue(recorded, out var known))
            return known == replayed;
        if (!_mapped.Add(replayed))
            return false;
        _ids[recorded] = replayed;
        return true;
    }

    private static string Show(object? v) => v switch
    {
        ByteString b => b.Length <= 16 ? Hex(b) : $"{b.Length} bytes",
        IEnumerable e and not string => "[" + string.Join(", ", e.Cast<object>().Take(8)) + "]",
        _ => v?.ToString() ?? "null",
    };

    private static string Hex(ByteString b) => Convert.ToHexString(b.Span).ToLowerInvariant();

    private bool Diverge(long step, string method, string what)
    {
        _divergences.Add(new ReplayDivergence(step, method, what));
        return false;
    }
}
