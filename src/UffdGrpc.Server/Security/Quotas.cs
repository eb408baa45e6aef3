using System.Collections.Concurrent;
using Google.Protobuf.WellKnownTypes;
using Google.Rpc;
using Grpc.Core;
using Microsoft.Extensions.Options;

namespace UffdGrpc.Server.Security;

/// <summary>The checks of <see cref="LimitOptions"/>, and the per-principal stream counts.</summary>
public sealed class Quotas(IOptions<LimitOptions> options)
{
    private readonly ConcurrentDictionary<string, int> _streams = new(StringComparer.Ordinal);

    public LimitOptions Limits { get; } = options.Value;

    /// <summary>RESOURCE_EXHAUSTED with a QuotaFailure naming the limit, unless <paramref name="count"/> is below <paramref name="limit"/>.</summary>
    public static void Check(long count, long limit, string name, string subject)
    {
        if (count < limit)
            return;
        throw Exhausted(name, limit, subject, $"{name}: {subject} already holds {count} (the limit is {limit})");
    }

    /// <summary>RESOURCE_EXHAUSTED with <paramref name="message"/> and a QuotaFailure naming Limits:<paramref name="name"/>.</summary>
    public static RpcException Exhausted(string name, long limit, string subject, string message) => new Google.Rpc.Status
    {
        Code = (int)Code.ResourceExhausted,
        Message = message,
        Details =
        {
            Any.Pack(new QuotaFailure
            {
                Violations = { new QuotaFailure.Types.Violation { Subject = subject, Description = $"{name} = {limit} (Limits:{name})" } },
            }),
        },
    }.ToRpcException();

    /// <summary>Counts a stream opening for the current principal; dispose the result when it closes.</summary>
    public StreamLease OpenStream()
    {
        var who = Caller.Principal ?? AuthOptions.AnonymousPrincipal;
        var n = _streams.AddOrUpdate(who, 1, (_, v) => v + 1);
        if (n > Limits.StreamsPerPrincipal)
        {
            _streams.AddOrUpdate(who, 0, (_, v) => v - 1);
            Check(n - 1, Limits.StreamsPerPrincipal, nameof(LimitOptions.StreamsPerPrincipal), "principal " + who);
        }
        return new StreamLease(this, who);
    }

    /// <summary>An open stream's place in its principal's count.</summary>
    public readonly struct StreamLease(Quotas quotas, string who) : IDisposable
    {
        public void Dispose() => quotas._streams.AddOrUpdate(who, 0, (_, v) => v - 1);
    }
}
