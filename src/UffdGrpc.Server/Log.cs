namespace UffdGrpc.Server;

/// <summary>The server's log messages (source-generated, stable event ids).</summary>
internal static partial class Log
{
    [LoggerMessage(EventId = 50, EventName = "WatchdogKilled", Level = LogLevel.Warning, Message = "Machine {MachineId}: thread {Tid} slept {Seconds} s in a userfault: the watchdog sent it SIGKILL (Watchdog:UserfaultSeconds)")]
    public static partial void WatchdogKilled(ILogger logger, long machineId, int tid, double seconds);

    [LoggerMessage(EventId = 1, EventName = "MachineCreated", Level = LogLevel.Debug, Message = "Machine {MachineId} created (profile {Profile})")]
    public static partial void MachineCreated(ILogger logger, long machineId, UffdGrpc.Mm.KernelProfile profile);

    [LoggerMessage(EventId = 2, EventName = "MachineDestroyed", Level = LogLevel.Debug, Message = "Machine {MachineId} destroyed")]
    public static partial void MachineDestroyed(ILogger logger, long machineId);

    [LoggerMessage(EventId = 3, EventName = "EventStreamOpened", Level = LogLevel.Debug, Message = "Event stream opened on uffd {UffdId}")]
    public static partial void EventStreamOpened(ILogger logger, long uffdId);

    [LoggerMessage(EventId = 4, EventName = "EventStreamClosed", Level = LogLevel.Debug, Message = "Event stream on uffd {UffdId} ended after {Count} messages")]
    public static partial void EventStreamClosed(ILogger logger, long uffdId, long count);

    [LoggerMessage(EventId = 5, EventName = "MessageLostWithStream", Level = LogLevel.Warning, Message = "Uffd {UffdId}: a {Event} message was read but its stream broke; it stays read")]
    public static partial void MessageLostWithStream(ILogger logger, long uffdId, string @event);

    [LoggerMessage(EventId = 6, EventName = "AnonymousAccess", Level = LogLevel.Warning, Message = "Anonymous access is allowed from any address (Auth:Anonymous=Allow): every caller without a token shares the principal 'anonymous'. Set Auth:Tokens and Auth:Anonymous=Deny to require tokens.")]
    public static partial void AnonymousFromAnywhere(ILogger logger);

    [LoggerMessage(EventId = 7, EventName = "AuthMode", Level = LogLevel.Information, Message = "Auth: anonymous access {Anonymous}, {Tokens} bearer token(s) configured")]
    public static partial void AuthMode(ILogger logger, UffdGrpc.Server.Security.AnonymousAccess anonymous, int tokens);

    [LoggerMessage(EventId = 8, EventName = "Telemetry", Level = LogLevel.Information, Message = "Metrics: Prometheus scrape path {Path} on {Endpoint}; OTLP {Otlp}")]
    public static partial void Telemetry(ILogger logger, string path, string endpoint, string otlp);
}
