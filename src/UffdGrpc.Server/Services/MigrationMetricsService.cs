using Grpc.Core;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Hosting;
using UffdGrpc.Server.Mapping;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Services;

/// <summary>Migration metrics of a machine or a process, read under the machine's lock (<see cref="Model.MigrationStats"/>).</summary>
public sealed class MigrationMetricsService(MachineRegistry registry) : Contracts.V1.MigrationMetricsService.MigrationMetricsServiceBase
{
    /// <summary>Upper bounds of the buckets in µs: 2^(n+1), the last open-ended (0).</summary>
    private static readonly ulong[] s_upperBounds = [.. Enumerable.Range(0, Model.MigrationStats.Buckets).Select(n => n == Model.MigrationStats.Buckets - 1 ? 0UL : 1UL << (n + 1))];

    public override Task<GetMigrationMetricsResponse> GetMigrationMetrics(GetMigrationMetricsRequest request, ServerCallContext context)
    {
        MachineHost host;
        MmEntry? mm = null;
        if (request.MmId != 0)
        {
            mm = registry.Mm(request.MmId);
            host = mm.Host;
            RequestErrors.Require(request.MachineId == 0 || request.MachineId == host.Id, "machine_id", "0 or the machine of mm_id");
        }
        else
        {
            host = registry.Machine(request.MachineId);
        }
        var r = new GetMigrationMetricsResponse { MachineId = host.Id, MmId = mm?.Id ?? 0 };
        r.BucketUpperBoundsUs.AddRange(s_upperBounds);
        host.Kernel.Locked(() =>
        {
            var stats = mm is null ? host.Kernel.Migration : mm.Mm.Migration;
            foreach (var d in stats.Distributions())
            {
                var h = new LatencyHistogram
                {
                    FaultClass = ToProto(d.Class),
                    Outcome = ToProto(d.Outcome),
                    Phase = (FaultPhase)((int)d.Phase + 1),
                    Count = (ulong)d.Count,
                    SumUs = d.SumMicros,
                };
                h.Counts.AddRange(d.Counts.Select(c => (ulong)c));
                r.Histograms.Add(h);
            }
            var mms = mm is null ? host.Kernel.Mms.ToList() : [mm.Mm];
            r.Counters = new MigrationCounters
            {
                PagesMoved = (ulong)stats.PagesMoved,
                BytesMoved = (ulong)stats.BytesMoved,
                RoundTrips = (ulong)stats.RoundTrips,
                ResidentPages = (ulong)mms.Sum(m => m.ResidentPages),
                FaultsRaised = (ulong)stats.FaultsRaised,
                FaultsEnded = (ulong)stats.FaultsEnded,
                FillsEexist = (ulong)stats.FillsEexist,
                FillsEagain = (ulong)stats.FillsEagain,
                FillsEsrch = (ulong)stats.FillsEsrch,
            };
            foreach (var m in mms)
            {
                var p = new ProcessBlocktime { MmId = registry.IdOf(host, m), BlocktimeNs = m.Blocktime.Ticks * 100 };
                p.Threads.AddRange(m.Threads.Select(t => new ThreadBlocktime { ThreadId = registry.IdOf(host, t), BlocktimeNs = t.Blocktime.Ticks * 100 }));
                r.Processes.Add(p);
            }
        });
        return Task.FromResult(r);
    }

    internal static FaultClass ToProto(Model.UserfaultClass c) => c switch
    {
        Model.UserfaultClass.Missing => FaultClass.Missing,
        Model.UserfaultClass.Wp => FaultClass.Wp,
        _ => FaultClass.Minor,
    };

    internal static FaultOutcome ToProto(Model.UserfaultOutcome o) => o switch
    {
        Model.UserfaultOutcome.Copy => FaultOutcome.Copy,
        Model.UserfaultOutcome.Zeropage => FaultOutcome.Zeropage,
        Model.UserfaultOutcome.Writeprotect => FaultOutcome.Unwp,
        Model.UserfaultOutcome.Continue => FaultOutcome.Continue,
        Model.UserfaultOutcome.Move => FaultOutcome.Move,
        Model.UserfaultOutcome.Wake => FaultOutcome.Wake,
        Model.UserfaultOutcome.Eexist => FaultOutcome.Eexist,
        Model.UserfaultOutcome.Eagain => FaultOutcome.Eagain,
        Model.UserfaultOutcome.Esrch => FaultOutcome.Esrch,
        Model.UserfaultOutcome.Poison => FaultOutcome.Poison,
        Model.UserfaultOutcome.Unregister => FaultOutcome.Unregister,
        Model.UserfaultOutcome.Close => FaultOutcome.Close,
        Model.UserfaultOutcome.Signal => FaultOutcome.Signal,
        _ => FaultOutcome.Exit,
    };
}
