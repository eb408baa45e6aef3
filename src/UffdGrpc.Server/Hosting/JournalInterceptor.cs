using Google.Protobuf;
using Grpc.Core;
using Grpc.Core.Interceptors;

namespace UffdGrpc.Server.Hosting;

/// <summary>
/// The session journal's recorder: a unary call that names a journaled machine and may
/// change it runs as the current <see cref="JournalCall"/>; the model gives it its step the
/// first time it runs it (<see cref="MachineHost.Run{T}"/>), and the call records its answer
/// here. Once the call has its step the response headers carry it
/// (<see cref="StepHeader"/>), also while the call sleeps, so a replayer knows the model has
/// run it before it issues the next one. Calls refused before the model ran them (malformed,
/// unknown ids) get no step: they changed nothing.
/// </summary>
public sealed class JournalInterceptor(MachineRegistry registry) : Interceptor
{
    /// <summary>The response header with the call's journal step.</summary>
    public const string StepHeader = "uffd-journal-step";

    public override Task<TResponse> UnaryServerHandler<TRequest, TResponse>(TRequest request, ServerCallContext context, UnaryServerMethod<TRequest, TResponse> continuation)
    {
        // No journaled machine anywhere (the usual case), or not one this call changes: the
        // call goes straight on, with no async frame.
        if (!registry.AnyJournal || request is not IMessage m)
            return continuation(request, context);
        var method = context.Method.TrimStart('/');
        if (MachineJournal.IsReadOnly(method) || registry.HostNamedBy(m, out _) is not { Journal: not null })
            return continuation(request, context);
        return JournaledAsync(new JournalCall(method, m), request, context, continuation);
    }

    private static async Task<TResponse> JournaledAsync<TRequest, TResponse>(JournalCall call, TRequest request, ServerCallContext context, UnaryServerMethod<TRequest, TResponse> continuation)
        where TRequest : class
        where TResponse : class
    {
        JournalCall.Current = call;
        var run = continuation(request, context);
        JournalCall.Current = null;
        try
        {
            // The step is set (after the lock is released) before the model call returns.
            await Task.WhenAny(run, call.Stamped.Task).ConfigureAwait(false);
            if (call.Stamped.Task.IsCompletedSuccessfully)
            {
                var step = call.Stamped.Task.Result;
                await context.WriteResponseHeadersAsync(new Metadata { { StepHeader, step.ToString(System.Globalization.CultureInfo.InvariantCulture) } }).ConfigureAwait(false);
            }
            var response = await run.ConfigureAwait(false);
            call.Answer(response as IMessage, 0, "");
            return response;
        }
        catch (RpcException ex)
        {
            call.Answer(null, (int)ex.StatusCode, ex.Status.Detail);
            throw;
        }
        catch (Exception ex) when (ex is not OperationCanceledException)
        {
            call.Answer(null, (int)StatusCode.Internal, ex.Message);
            throw;
        }
    }
}
