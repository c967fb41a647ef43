print("tunneld: under construction")
