using System.Net;
using System.Security.Cryptography;
using System.Text;
using Grpc.Core;
using Grpc.Core.Interceptors;
using Microsoft.Extensions.Options;

namespace UffdGrpc.Server.Security;

/// <summary>
/// Authenticates every call: an <c>authorization: Bearer TOKEN</c> header names a principal
/// (tokens from <see cref="AuthOptions"/>, compared in constant time); a call without one is
/// the anonymous principal where <see cref="AuthOptions.Anonymous"/> allows it. Anything else
/// is UNAUTHENTICATED before any service code runs.
/// </summary>
public sealed class AuthInterceptor : Interceptor
{
    private readonly AnonymousAccess _anonymous;
    private readonly (byte[] Token, string Principal)[] _tokens;

    public AuthInterceptor(IOptions<AuthOptions> options)
    {
        ArgumentNullException.ThrowIfNull(options);
        _anonymous = options.Value.Anonymous;
        _tokens = [.. options.Value.Tokens.Select(p => (Encoding.UTF8.GetBytes(p.Value), p.Key))];
    }

    /// <summary>The principal of a call, or the UNAUTHENTICATED status.</summary>
    private string Authenticate(ServerCallContext context)
    {
        // Health probes (orchestrators, load balancers) carry no credentials and see no machine.
        if (context.Method.StartsWith("/grpc.health.v1.Health/", StringComparison.Ordinal))
            return AuthOptions.AnonymousPrincipal;
        // Straight from the HTTP request: ServerCallContext.RequestHeaders would copy every
        // header of every call into a Metadata collection first.
        var header = AuthorizationHeader(context);
        if (header is not null)
        {
            const string scheme = "Bearer ";
            if (!header.StartsWith(scheme, StringComparison.OrdinalIgnoreCase))
                throw Unauthenticated("the authorization header must be 'Bearer TOKEN'");
            var presented = Encoding.UTF8.GetBytes(header[scheme.Length..].Trim());
            foreach (var (token, principal) in _tokens)
            {
                if (CryptographicOperations.FixedTimeEquals(token, presented))
                    return principal;
            }
            throw Unauthenticated("unknown bearer token");
        }
        var allowed = _anonymous switch
        {
            AnonymousAccess.Allow => true,
            AnonymousAccess.Loopback => IsLoopback(context),
            _ => false,
        };
        return allowed ? AuthOptions.AnonymousPrincipal : throw Unauthenticated("a bearer token is required (Auth:Anonymous is " + _anonymous + ")");
    }

    /// <summary>The call's authorization header, or null (the last one, as Metadata.GetValue would give).</summary>
    private static string? AuthorizationHeader(ServerCallContext context)
    {
        var values = context.GetHttpContext().Request.Headers.Authorization;
        return values.Count == 0 ? null : values[values.Count - 1];
    }

    /// <summary>The peer is this machine (or an in-process test server, which has no socket).</summary>
    private static bool IsLoopback(ServerCallContext context)
    {
        var ip = context.GetHttpContext().Connection.RemoteIpAddress;
        return ip is null || IPAddress.IsLoopback(ip);
    }

    private static RpcException Unauthenticated(string why) => new(new Status(StatusCode.Unauthenticated, why));

    public override Task<TResponse> UnaryServerHandler<TRequest, TResponse>(TRequest request, ServerCallContext context, UnaryServerMethod<TRequest, TResponse> continuation)
    {
        Caller.Principal = Authenticate(context);
        return continuation(request, context);
    }

    public override Task ServerStreamingServerHandler<TRequest, TResponse>(TRequest request, IServerStreamWriter<TResponse> responseStream, ServerCallContext context, ServerStreamingServerMethod<TRequest, TResponse> continuation)
    {
        Caller.Principal = Authenticate(context);
        return continuation(request, responseStream, context);
    }

    public override Task DuplexStreamingServerHandler<TRequest, TResponse>(IAsyncStreamReader<TRequest> requestStream, IServerStreamWriter<TResponse> responseStream, ServerCallContext context, DuplexStreamingServerMethod<TRequest, TResponse> continuation)
    {
        Caller.Principal = Authenticate(context);
        return continuation(requestStream, responseStream, context);
    }

    /// <summary>Client streams (ImportMm) are authenticated as every other call shape: the base interceptor would pass them on with no principal, which the registry reads as in-process use.</summary>
    public override Task<TResponse> ClientStreamingServerHandler<TRequest, TResponse>(IAsyncStreamReader<TRequest> requestStream, ServerCallContext context, ClientStreamingServerMethod<TRequest, TResponse> continuation)
    {
        Caller.Principal = Authenticate(context);
        return continuation(requestStream, context);
    }
}
