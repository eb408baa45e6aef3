using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Hosting;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Mapping;

/// <summary>Injection rules and records between the wire (server ids) and the model (a machine's own ids). Callers of the ToProto methods hold the machine lock.</summary>
public static class InjectMapping
{
    public static Model.InjectRule ToModel(MachineRegistry registry, MachineHost h, InjectRule r)
    {
        RequestErrors.Require(r.Site != InjectSite.Unspecified && Enum.IsDefined(r.Site), "rule.site", "unknown or unspecified site");
        int? mm = null;
        int? uffd = null;
        if (r.MmId != 0)
        {
            var e = registry.Mm(r.MmId, "rule.mm_id");
            RequestErrors.Require(e.Host == h, "rule.mm_id", "the address space belongs to another machine");
            mm = e.Mm.Id;
        }
        if (r.UffdId != 0)
        {
            var u = registry.Uffd(r.UffdId);
            RequestErrors.Require(u.Host == h, "rule.uffd_id", "the uffd belongs to another machine");
            uffd = u.Ctx.Id;
        }
        RequestErrors.Require(r.Tid >= 0, "rule.tid", "must not be negative");
        RequestErrors.Require(r.Name.Length <= 256 && r.Method.Length <= 256, "rule.name", "name and method are limited to 256 characters");
        return new Model.InjectRule
        {
            Site = (Model.InjectSite)(int)r.Site,
            Name = r.Name,
            MmId = mm,
            UffdId = uffd,
            Tid = r.Tid == 0 ? null : r.Tid,
            Start = r.Start,
            End = r.End,
            Method = r.Method,
            Every = r.Every == 0 ? 1 : r.Every,
            Probability = r.Probability ?? 1,
            MaxFirings = r.MaxFirings,
            After = r.After,
            Until = r.Until,
            DurationMs = r.DurationMs,
            Seed = r.Seed,
            Pages = r.Pages,
            Wake = r.Wake,
            Count = r.Count,
            DelayMs = r.DelayMs,
            JitterMs = r.JitterMs,
            Status = r.Status,
        };
    }

    public static InjectRule ToProto(MachineHost h, Model.InjectRule r) => new()
    {
        Site = (InjectSite)(int)r.Site,
        Name = r.Name,
        MmId = r.MmId is { } m ? MmId(h, m) : 0,
        UffdId = r.UffdId is { } u ? UffdId(h, u) : 0,
        Tid = r.Tid ?? 0,
        Start = r.Start,
        End = r.End,
        Method = r.Method,
        Every = r.Every,
        Probability = r.Probability,
        MaxFirings = r.MaxFirings,
        After = r.After,
        Until = r.Until,
        DurationMs = r.DurationMs,
        Seed = r.Seed,
        Pages = r.Pages,
        Wake = r.Wake,
        Count = r.Count,
        DelayMs = r.DelayMs,
        JitterMs = r.JitterMs,
        Status = r.Status,
    };

    public static InjectionRecord ToProto(MachineHost h, Model.InjectionRecord r) => new()
    {
        Seq = r.Seq,
        ModelStep = r.Step,
        Site = (InjectSite)(int)r.Site,
        RuleId = r.RuleId,
        RuleName = r.RuleName,
        MmId = r.MmId == 0 ? 0 : MmId(h, r.MmId),
        UffdId = r.UffdId == 0 ? 0 : UffdId(h, r.UffdId),
        Tid = r.Tid,
        Address = r.Address,
        Detail = r.Detail,
    };

    private static long MmId(MachineHost h, int modelId) => h.MmIds.FirstOrDefault(p => p.Key.Id == modelId).Value;

    private static long UffdId(MachineHost h, int modelId) => h.UffdIds.FirstOrDefault(p => p.Key.Id == modelId).Value;
}
