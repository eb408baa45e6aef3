using System.Globalization;
using UffdGrpc.Mm;
using static UffdGrpc.Scenarios.ScenarioParsing;

namespace UffdGrpc.Scenarios;

/// <summary>
/// <c>pvread</c>/<c>pvwrite</c> (the harness's cmd_pvm): process_vm_readv/writev from an
/// executor, the remote process being <c>self</c>, <c>child</c> (from the worker),
/// <c>parent</c> (from the child) or <c>nopid</c> (no such process).
/// </summary>
public sealed partial class ScenarioInterpreter
{
    /// <summary>PVM_MAXIOV of the harness: the iovec arrays' size (liovcnt=/riovcnt= are capped to it).</summary>
    private const int HarnessMaxIov = 1100;

    private const string PvmUsage = "USAGE pvread|pvwrite WHO LNAME LFIRST LCOUNT... <-|-> RNAME RFIRST RCOUNT... [flags=N]";

    /// <summary>Parses a pvread/pvwrite line into a ProcessVm request, or gives the USAGE line the harness prints.</summary>
    private ThreadOpRequest? ProcessVmOpFor(string[] argv, Executor? ex, out string usage)
    {
        usage = PvmUsage;
        var write = argv[0] == "pvwrite";
        var arrow = write ? "->" : "<-";
        if (argv.Length < 2)
            return null;
        int remoteProc;
        switch (argv[1])
        {
            case "self":
                remoteProc = ex?.Process ?? _mainProc;
                break;
            case "child" when ex is { IsChild: false } && _child.Process != 0:
                remoteProc = _child.Process;
                break;
            case "parent" when ex is { IsChild: true }:
                remoteProc = _mainProc;
                break;
            case "nopid":
                remoteProc = 0;
                break;
            default:
                usage = "USAGE pvread WHO: self|child|parent|nopid";
                return null;
        }
        List<IoVec> local = [], remote = [];
        ulong flags = 0;
        long lcnt = -1, rcnt = -1;
        var inRemote = false;
        for (var i = 2; i < argv.Length;)
        {
            var w = argv[i];
            if (w == arrow)
            {
                inRemote = true;
                i++;
                continue;
            }
            if (w.StartsWith("flags=", StringComparison.Ordinal))
            {
                flags = Num(w[6..]);
                i++;
                continue;
            }
            if (w.StartsWith("liovcnt=", StringComparison.Ordinal) || w.StartsWith("riovcnt=", StringComparison.Ordinal))
            {
                var n = (long)Num(w[8..]);
                if (w[0] == 'l')
                    lcnt = n;
                else
                    rcnt = n;
                i++;
                continue;
            }
            if (i + 3 > argv.Length || !ParseLoc(argv[i], argv[i + 1], out var a, out _) || !ParseIovLen(argv[i + 2], out var len))
                return null;
            (inRemote ? remote : local).Add(new IoVec(a, len));
            i += 3;
        }
        if (!inRemote)
        {
            usage = "USAGE pvread|pvwrite: missing <- or ->";
            return null;
        }
        return new ThreadOpRequest(ThreadOpKind.ProcessVm)
        {
            Write = write,
            RemoteProcess = remoteProc,
            Flags = flags,
            LocalIov = Resize(local, lcnt),
            RemoteIov = Resize(remote, rcnt),
        };
    }

    /// <summary>The iovec array as passed with an explicit count: extra entries are empty, the count is capped at the harness's array size.</summary>
    private static IoVec[] Resize(List<IoVec> vecs, long count)
    {
        var n = count < 0 ? vecs.Count : (int)Math.Min(count, HarnessMaxIov);
        var arr = new IoVec[n];
        for (var i = 0; i < n && i < vecs.Count; i++)
            arr[i] = vecs[i];
        return arr;
    }

    /// <summary>An iov_len: a page count as parse_pages reads it, or -N bytes (strtoll, the whole word).</summary>
    private static bool ParseIovLen(string s, out ulong len)
    {
        len = 0;
        if (s.StartsWith('-'))
        {
            var v = StrToULL(s[1..], out var used);
            if (used == 0 || used != s.Length - 1)
                return false;
            len = unchecked((ulong)-(long)v);
            return true;
        }
        return ParsePages(s, out len);
    }

    /// <summary>The result of a pvread/pvwrite: <c>ok n=BYTES</c> or the errno name.</summary>
    private static string FormatProcessVm(ThreadOpResult r) =>
        r.Errno == Errno.OK ? "ok n=" + r.Transferred.ToString(CultureInfo.InvariantCulture) : r.Errno.Name();
}
