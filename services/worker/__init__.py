"""What prefill and decode workers share: the engine thread, proto conversion,
registration with the router. (The two roles never import each other.)"""
