using Grpc.Core;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Hosting;
using UffdGrpc.Server.Mapping;
using UffdGrpc.Server.Security;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Services;

/// <summary>Fault injection: rules, firing on demand, and the injection log (the model decides and applies; see <see cref="Model.Kernel.AddInjectRule"/>).</summary>
public sealed class FaultInjectionService(MachineRegistry registry, Quotas quotas) : Contracts.V1.FaultInjectionService.FaultInjectionServiceBase
{
    public override Task<AddRuleResponse> AddRule(AddRuleRequest request, ServerCallContext context)
    {
        var h = registry.Machine(request.MachineId);
        var rule = InjectMapping.ToModel(registry, h, request.Rule ?? throw RequestErrors.Invalid("rule", "a rule is required"));
        var active = h.Run(() =>
        {
            Quotas.Check(h.Kernel.InjectRules.Count, Model.Kernel.MaxInjectRules, "InjectRulesPerMachine", $"machine {h.Id}");
            return h.Kernel.AddInjectRule(rule, out var error) ?? throw RequestErrors.Invalid("rule", error!);
        });
        return Task.FromResult(new AddRuleResponse { RuleId = active.Id });
    }

    public override Task<ListRulesResponse> ListRules(ListRulesRequest request, ServerCallContext context)
    {
        var h = registry.Machine(request.MachineId);
        var r = new ListRulesResponse();
        h.Run(() => r.Rules.AddRange(h.Kernel.InjectRules.Select(a => new RuleInfo
        {
            RuleId = a.Id,
            Rule = InjectMapping.ToProto(h, a.Rule),
            Eligible = a.Eligible,
            Firings = a.Firings,
        })));
        return Task.FromResult(r);
    }

    public override Task<RemoveRuleResponse> RemoveRule(RemoveRuleRequest request, ServerCallContext context)
    {
        var h = registry.Machine(request.MachineId);
        if (!h.Run(() => request.RuleId is > 0 and <= int.MaxValue && h.Kernel.RemoveInjectRule((int)request.RuleId)))
            throw RequestErrors.UnknownId("rule_id", request.RuleId, "injection rule");
        h.InjectionPulse.Fire();
        return Task.FromResult(new RemoveRuleResponse());
    }

    public override Task<FireRuleResponse> FireRule(FireRuleRequest request, ServerCallContext context)
    {
        var h = registry.Machine(request.MachineId);
        var (records, error) = h.Run(() =>
        {
            if (request.RuleId is <= 0 or > int.MaxValue || !h.Kernel.InjectRules.Any(a => a.Id == request.RuleId))
                throw RequestErrors.UnknownId("rule_id", request.RuleId, "injection rule");
            var recs = h.Kernel.FireNow((int)request.RuleId, out var why);
            return (recs.Select(rec => InjectMapping.ToProto(h, rec)).ToList(), why);
        });
        if (error is not null)
            throw RequestErrors.Precondition("NOTHING_TO_INJECT", error);
        var r = new FireRuleResponse();
        r.Records.AddRange(records);
        return Task.FromResult(r);
    }

    public override Task<ReadLogResponse> ReadLog(ReadLogRequest request, ServerCallContext context)
    {
        var h = registry.Machine(request.MachineId);
        RequestErrors.Require(request.Max >= 0, "max", "must not be negative");
        var r = new ReadLogResponse();
        h.Run(() =>
        {
            var max = request.Max == 0 ? Model.Kernel.InjectionLogCapacity : request.Max;
            r.Records.AddRange(h.Kernel.InjectionLog(request.AfterSeq, max).Select(rec => InjectMapping.ToProto(h, rec)));
            r.Total = h.Kernel.InjectionCount;
        });
        return Task.FromResult(r);
    }

    /// <summary>Sends what the log holds after after_seq, then sleeps until the next firing (or the machine ends); no polling.</summary>
    public override async Task WatchLog(WatchLogRequest request, IServerStreamWriter<WatchLogResponse> responseStream, ServerCallContext context)
    {
        var h = registry.Machine(request.MachineId);
        using var lease = quotas.OpenStream();
        var after = request.AfterSeq;
        var ct = context.CancellationToken;
        while (true)
        {
            var wake = h.InjectionPulse.Next;
            if (registry.Unusable(h) is { } status)
                throw status;
            var batch = h.Run(() => h.Kernel.InjectionLog(after, 256).Select(rec => (rec.Seq, Proto: InjectMapping.ToProto(h, rec))).ToList());
            foreach (var (seq, proto) in batch)
            {
                await responseStream.WriteAsync(new WatchLogResponse { Record = proto }, ct).ConfigureAwait(false);
                after = seq;
            }
            if (batch.Count == 0)
                await wake.WaitAsync(ct).ConfigureAwait(false);
        }
    }
}
